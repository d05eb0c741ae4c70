"""Datasets: sources, archives, images, transforms and prepared datasets."""
