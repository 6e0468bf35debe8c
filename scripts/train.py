#!/usr/bin/env python
"""Train ViViT on a MedMNIST 3D set and leave a publishable model folder: `vivit-medmnist-train` (`python -m vivit_medmnist.train`) run from a checkout. See that module."""

from vivit_medmnist.train import main

if __name__ == "__main__":
    main()
