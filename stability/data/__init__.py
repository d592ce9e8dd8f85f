"""Datasets as in-memory tensors: packaged, torchvision and registered sources, seeded splits, augmentation."""
