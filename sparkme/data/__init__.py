"""Datasets: for pretraining bundled sample photos, image folders, synthetic noise; labelled folders for fine-tuning
and evaluation."""

from sparkme.data.imagefolder import ImageFolderDataset
from sparkme.data.labelled import LabelledImages, LabelledLayout, check_labelled_root, labelled_splits
from sparkme.data.samples import SamplePhotos
from sparkme.data.synthetic import SyntheticImages
from sparkme.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "LabelledImages", "LabelledLayout", "SamplePhotos",
           "SyntheticImages", "check_labelled_root", "labelled_splits", "pretrain_transform"]
