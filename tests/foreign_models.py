"""Small models exported the way weaver-core, salt and a plain ``torch.onnx.export`` export
theirs, with their preprocessing files, for the ``bsym adopt`` tests and benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import yaml

ISOLATION_FEATURES: dict[str, Any] = {
    "tree": "Muons",
    "objects": "Muon",
    "constituents": {
        "features": [
            {"branch": "CaloCell_et", "transform": "log"},
            {"branch": "CaloCell_eta", "relative_to": "Muon_eta"},
            {"branch": "CaloCell_phi", "relative_to": "Muon_phi", "periodic": True},
        ],
        "max_count": 32,
        "sort_by": "CaloCell_et",
        "link": "CaloCell_muonIdx",
    },
    "globals": [{"branch": "Muon_pt", "transform": "log"}],
}
WEAVER_VARS = ["part_loget", "part_deta", "part_dphi"]
WEAVER_CENTRE = [-1.0, 0.0, 0.0]
WEAVER_SCALE = [0.5, 4.0, 4.0]
WEAVER_LENGTH = 32


class WeaverPFN(torch.nn.Module):
    """weaver's layout: ``pf_features`` (N, F, P) and ``pf_mask`` (N, 1, P), ``softmax`` out."""

    def __init__(self, features: int = 3, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.phi = torch.nn.Sequential(
            torch.nn.Conv1d(features, 16, 1), torch.nn.ReLU(), torch.nn.Conv1d(16, 16, 1)
        )
        self.f = torch.nn.Sequential(
            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
        )

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = (self.phi(features) * mask).sum(dim=2)
        return torch.softmax(self.f(pooled), dim=1)


class SaltTagger(torch.nn.Module):
    """salt's layout: ``jet_features`` (1, J), ``track_features`` (T, F) with no batch axis,
    one scalar output per flavour."""

    def __init__(self, jet: int = 1, track: int = 3) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.track = torch.nn.Sequential(torch.nn.Linear(track, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16 + jet, 3)

    def forward(self, jets: torch.Tensor, tracks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = self.track(tracks).sum(dim=0, keepdim=True)
        probs = torch.softmax(self.head(torch.cat([pooled, jets], dim=1)), dim=-1)
        return tuple(p.squeeze() for p in torch.split(probs, 1, -1))


class UserNet(torch.nn.Module):
    """A user's own network: ``cells`` (N, P, F) unmasked, ``x`` (N, 1); a probability and an
    auxiliary embedding out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.cells = torch.nn.Linear(3, 8)
        self.out = torch.nn.Linear(9, 1)
        self.aux = torch.nn.Linear(9, 4)

    def forward(self, cells: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.cat([self.cells(cells).relu().sum(dim=1), x], dim=1)
        return torch.sigmoid(self.out(hidden)), self.aux(hidden)


def _export(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, **kwargs: Any
) -> None:
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), opset_version=17, dynamo=False, **kwargs)


def weaver_model(folder: Path) -> tuple[Path, Path, Path]:
    """model.onnx, preprocess.json and the data-config YAML, as weaver's --export-onnx writes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    example = (torch.rand(2, 3, WEAVER_LENGTH), torch.ones(2, 1, WEAVER_LENGTH))
    axes = {"pf_features": {0: "N", 2: "n_pf"}, "pf_mask": {0: "N", 2: "n_pf"}, "softmax": {0: "N"}}
    _export(
        WeaverPFN(),
        example,
        path,
        input_names=["pf_features", "pf_mask"],
        output_names=["softmax"],
        dynamic_axes=axes,
    )
    infos = {
        name: {
            "median": c,
            "norm_factor": s,
            "replace_inf_value": 0,
            "lower_bound": -5.0,
            "upper_bound": 5.0,
            "pad": 0,
        }
        for name, c, s in zip(WEAVER_VARS, WEAVER_CENTRE, WEAVER_SCALE, strict=True)
    }
    preprocess = {
        "output_names": ["label_prompt", "label_nonprompt"],
        "input_names": ["pf_features", "pf_mask"],
        "pf_features": {"var_names": WEAVER_VARS, "var_infos": infos, "var_length": WEAVER_LENGTH},
        "pf_mask": {
            "var_names": ["part_mask"],
            "var_infos": {
                "part_mask": {
                    "median": 0,
                    "norm_factor": 1,
                    "replace_inf_value": 0,
                    "lower_bound": -1e32,
                    "upper_bound": 1e32,
                    "pad": 0,
                }
            },
            "var_length": WEAVER_LENGTH,
        },
    }
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=2))
    config = {
        "inputs": {
            "pf_features": {
                "length": WEAVER_LENGTH,
                "pad_mode": "constant",
                "vars": [
                    [n, c, s, -5.0, 5.0]
                    for n, c, s in zip(WEAVER_VARS, WEAVER_CENTRE, WEAVER_SCALE, strict=True)
                ],
            },
            "pf_mask": {
                "length": WEAVER_LENGTH,
                "pad_mode": "constant",
                "vars": [["part_mask", None]],
            },
        },
        "labels": {"type": "simple", "value": ["label_prompt", "label_nonprompt"]},
    }
    (folder / "data_config.yaml").write_text(yaml.safe_dump(config))
    return path, folder / "preprocess.json", folder / "data_config.yaml"


def weaver_adoption(folder: Path, **adopt: Any) -> Path:
    spec = {
        "features": ISOLATION_FEATURES,
        "adopt": {
            "weaver": {"preprocess": "preprocess.json"},
            "inputs": {"pf_features": {"tensor": "constituents"}, "pf_mask": {"tensor": "mask"}},
            **adopt,
        },
    }
    path = folder / "adopt.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


SALT_OFFSETS = [-3.0]
SALT_SCALES = [0.5]


def salt_model(folder: Path, name: str = "Toy") -> Path:
    """network.onnx with salt's inputs, ``<name>_p<flavour>`` outputs and ``gnn_config``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "network.onnx"
    outputs = [f"{name}_pb", f"{name}_pc", f"{name}_pu"]
    _export(
        SaltTagger(),
        (torch.rand(1, 1), torch.rand(5, 3)),
        path,
        input_names=["jet_features", "track_features"],
        output_names=outputs,
        dynamic_axes={"track_features": {0: "n_tracks"}},
    )
    config = {
        "inputs": [
            {
                "name": "jet_var",
                "variables": [{"name": "pt", "offset": SALT_OFFSETS[0], "scale": SALT_SCALES[0]}],
            }
        ],
        "input_sequences": [
            {
                "name": "tracks_r22default_sd0sort",
                "variables": [
                    {"name": v, "offset": 0.0, "scale": 1.0} for v in ("logEt", "deta", "dphi")
                ],
            }
        ],
        "onnx_model_version": "v1",
    }
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"gnn_config": json.dumps(config)})
    onnx.save(proto, str(path))
    return path


def salt_adoption(folder: Path) -> Path:
    spec = {
        "features": ISOLATION_FEATURES,
        "adopt": {
            "salt": True,
            "inputs": {
                "jet_features": {"tensor": "globals"},
                "track_features": {"tensor": "constituents"},
            },
        },
    }
    path = folder / "adopt.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def user_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "user.onnx"
    _export(
        UserNet(),
        (torch.rand(2, 32, 3), torch.rand(2, 1)),
        path,
        input_names=["cells", "x"],
        output_names=["prob", "embedding"],
        dynamic_axes={
            "cells": {0: "batch"},
            "x": {0: "batch"},
            "prob": {0: "batch"},
            "embedding": {0: "batch"},
        },
    )
    return path


def user_adoption(folder: Path) -> Path:
    spec = {
        "features": ISOLATION_FEATURES,
        "adopt": {
            "inputs": {
                "cells": {"tensor": "constituents"},
                "x": {"tensor": "globals", "centre": [3.0]},
            },
            "score": ["prob"],
            "class_labels": ["prompt"],
        },
    }
    path = folder / "adopt.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


WEAVER_NETWORK = """
import torch


class PFN(torch.nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.phi = torch.nn.Sequential(torch.nn.Conv1d(features, 16, 1), torch.nn.ReLU())
        self.rho = torch.nn.Sequential(
            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
        )
        self.for_inference = False

    def forward(self, features, mask):
        out = self.rho((self.phi(features) * mask).sum(dim=2))
        return torch.softmax(out, dim=1) if self.for_inference else out


def get_model(data_config, **kwargs):
    model = PFN(len(data_config.input_dicts["pf_features"]), len(data_config.label_value))
    model.for_inference = kwargs.get("for_inference", False)
    axes = {k: {0: "N", 2: "n_pf"} for k in data_config.input_names}
    info = {
        "input_names": list(data_config.input_names),
        "input_shapes": {k: (1,) + s[1:] for k, s in data_config.input_shapes.items()},
        "output_names": ["softmax"],
        "dynamic_axes": {**axes, "softmax": {0: "N"}},
    }
    return model, info
"""


def weaver_core_export(folder: Path) -> list[str]:
    """A data config, a network config and an untrained state dict, exported by weaver-core's
    own ``weaver --export-onnx`` into ``folder/model.onnx`` and ``folder/preprocess.json``;
    returns the command."""
    import importlib.util

    from weaver.utils.dataset import DataConfig

    folder.mkdir(parents=True, exist_ok=True)
    vars = [
        [n, c, s, -5, 5] for n, c, s in zip(WEAVER_VARS, WEAVER_CENTRE, WEAVER_SCALE, strict=True)
    ]
    config = {
        "new_variables": {"part_mask": "ak.ones_like(part_loget)"},
        "preprocess": {"method": "manual"},
        "inputs": {
            "pf_features": {"length": WEAVER_LENGTH, "pad_mode": "constant", "vars": vars},
            "pf_mask": {
                "length": WEAVER_LENGTH,
                "pad_mode": "constant",
                "vars": [["part_mask", None]],
            },
        },
        "labels": {"type": "simple", "value": ["label_prompt", "label_nonprompt"]},
    }
    (folder / "data_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "network.py").write_text(WEAVER_NETWORK)
    spec = importlib.util.spec_from_file_location("weaver_network", folder / "network.py")
    assert spec is not None and spec.loader is not None
    network = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network)
    data_config = DataConfig.load(
        str(folder / "data_config.yaml"), load_observers=False, load_reweight_info=False
    )
    torch.manual_seed(5)
    model, _ = network.get_model(data_config)
    torch.save(model.state_dict(), folder / "state.pt")
    command = [
        str(Path(sys.executable).parent / "weaver"),
        "--data-config", str(folder / "data_config.yaml"),
        "--network-config", str(folder / "network.py"),
        "--model-prefix", str(folder / "state.pt"),
        "--export-onnx", str(folder / "model.onnx"),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return command
