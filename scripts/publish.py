#!/usr/bin/env python
"""Push a model folder written by train.py to the Hugging Face Hub: `vivit-medmnist-publish` (`python -m vivit_medmnist.publish`) run from a checkout. See that module."""

from vivit_medmnist.publish import main

if __name__ == "__main__":
    main()
