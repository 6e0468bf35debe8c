#!/usr/bin/env python
"""Label volumes in .npy / .npz / NIfTI files with a saved (or Hub) model: `vivit-medmnist-predict` (`python -m vivit_medmnist.predict`) run from a checkout. See that module."""

from vivit_medmnist.predict import main

if __name__ == "__main__":
    main()
