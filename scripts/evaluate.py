#!/usr/bin/env python
"""Evaluate a saved (or Hub) model on one split of a MedMNIST 3D set: `vivit-medmnist-evaluate` (`python -m vivit_medmnist.evaluate`) run from a checkout. See that module."""

from vivit_medmnist.evaluate import main

if __name__ == "__main__":
    main()
