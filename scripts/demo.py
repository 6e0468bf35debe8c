#!/usr/bin/env python
"""The browser demo of a saved (or Hub) model: `vivit-medmnist-demo` (`python -m vivit_medmnist.demo`) run from a checkout. See that module."""

from vivit_medmnist.demo import main

if __name__ == "__main__":
    main()
