"""The two classes, in label order: 0 = Normal, 1 = Tuberculosis (data and models both use it)."""

CLASS_NAMES = ("Normal", "Tuberculosis")
