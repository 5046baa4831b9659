"""Data: image sources, the train/val split, decoding and transforms, the LightningDataModule."""
