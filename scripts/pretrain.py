#!/usr/bin/env python
"""Pretrain a ViViT encoder by masked volume modelling: `vivit-medmnist-pretrain` (`python -m vivit_medmnist.pretraining`) run from a checkout. See that module."""

from vivit_medmnist.pretraining import main

if __name__ == "__main__":
    main()
