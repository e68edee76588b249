"""The training sources as the model card and the manifest name them (licence, where from)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DATA_CARDS = {
    "zheng1": {
        "name": "Zheng et al. 2018, dataset 1 (Jiangxi Tecom, rapid stain)",
        "licence": "GPL-3.0",
        "url": "github.com/zxaoyou/segmentation_WBC",
    },
    "zheng2": {
        "name": "Zheng et al. 2018, dataset 2 (CellaVision)",
        "licence": "GPL-3.0",
        "url": "github.com/zxaoyou/segmentation_WBC",
    },
    "bccd": {
        "name": "BCCD fields with Banik et al. 2020 WBC masks",
        "licence": "MIT",
        "url": "github.com/Shenggan/BCCD_Dataset",
    },
    "raabin": {
        "name": "Raabin-WBC part of TXL-PBC (boxes; GrabCut pseudo-masks)",
        "licence": "MIT",
        "url": "github.com/lugan113/TXL-PBC_Dataset",
    },
    "pbc": {
        "name": "PBC (Acevedo et al. 2020), CellaVision DM96, WBCAtt split",
        "licence": "CC BY 4.0",
        "url": "data.mendeley.com/datasets/snkd93bnjr/1",
    },
}

#: What a source gives the classifier where it differs from what it gives the segmenters.
CLS_DATA_NOTES: dict[str, dict[str, str]] = {
    "raabin": {
        "name": "Raabin-WBC part of TXL-PBC (boxes; GrabCut pseudo-masks for the segmenters; "
        "for the classifier, types from blinded reads in convert/reads/, cells whose type the "
        "image does not settle left out)"
    },
}


def training_card(source: str, labs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A classifier's training source as the manifest lists it; ``labs``: what a fine-tune run
    recorded of each lab's cells (``edge_wbc_convert.finetune.lab_cards``)."""
    from edge_wbc_convert.cells import is_lab_source

    if is_lab_source(source):
        lab = labs.get(source, {})
        where = f" from {lab['folder']}" if lab.get("folder") else ""
        return {
            "name": f"{source}: the lab's own labelled cells{where} (edge-wbc-convert finetune)",
            "licence": "the lab's",
            "url": "",
            "split": "train",
        }
    return DATA_CARDS[source] | CLS_DATA_NOTES.get(source, {}) | {"split": "train"}
