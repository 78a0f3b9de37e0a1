"""Datasets for pretraining: bundled sample photos, image folders, synthetic noise."""

from sparkme.data.imagefolder import ImageFolderDataset
from sparkme.data.samples import SamplePhotos
from sparkme.data.synthetic import SyntheticImages
from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "SamplePhotos", "SyntheticImages",
           "pretrain_transform"]
