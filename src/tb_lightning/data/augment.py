"""Train-time augmentation for chest X-rays (`data/augment=cxr`), from torchvision transforms v2.

Choices (conf/data/augment/cxr.yaml), all mild because a radiograph's geometry carries meaning:
- random resized crop, scale 0.85-1.0, aspect 0.9-1.1: framing and field of view vary between
  sites and technicians; strong crops would cut away the apices, where TB lesions sit;
- rotation up to 7 degrees and translation up to 5%: patient positioning;
- brightness and contrast jitter of 20%: exposure and detector differences;
- horizontal flip off by default: the heart and aortic knob sit on the patient's left, so a
  flipped film is not a real one (turn it on with data.augment.horizontal_flip=true).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from tb_lightning.data.preprocess import preprocess_steps
from tb_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def is_random(augment: Mapping[str, Any]) -> bool:
    """True when any random transform is on (then cached frozen features would be wrong)."""
    return bool(
        augment.get("crop_scale")
        or augment.get("rotation_degrees")
        or augment.get("translate")
        or augment.get("brightness")
        or augment.get("contrast")
        or augment.get("horizontal_flip")
    )


def build_train_transform(
    image_size: int, augment: Mapping[str, Any], preprocess: Mapping[str, Any] | None = None
) -> v2.Compose:
    """Crop or resize, preprocess as validation does (CLAHE or nothing), augment the rest (on
    uint8 images), then the same scale/normalise as validation."""
    steps: list[v2.Transform] = []
    if augment.get("crop_scale"):
        steps.append(
            v2.RandomResizedCrop(
                (image_size, image_size),
                scale=tuple(augment["crop_scale"]),
                ratio=tuple(augment.get("crop_ratio") or (0.9, 1.1)),
                antialias=True,
            )
        )
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    # Before the intensity jitter, so that training sees jittered versions of the equalised
    # image that validation sees.
    steps += preprocess_steps(preprocess)
    degrees = augment.get("rotation_degrees") or 0
    translate = augment.get("translate") or 0
    if degrees or translate:
        steps.append(v2.RandomAffine(degrees=degrees, translate=(translate, translate)))
    if augment.get("horizontal_flip"):
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if augment.get("brightness") or augment.get("contrast"):
        steps.append(
            v2.ColorJitter(
                brightness=augment.get("brightness") or 0, contrast=augment.get("contrast") or 0
            )
        )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)
