"""Faults of a fuzz round (crafted files and links in a results root, racing starts, edge values, signals):
each case refused with one line, or the run goes on; nothing outside the results root is ever touched."""
import os

import torch

import centralized
import common
from conftest import TINY
from helpers import tiny_model

FAST = TINY + ["--synthetic-size", "1000", "--eval-batch-size", "64"]


def test_feature_cache_never_returns_another_backbones_features(tmp_path):
    """Two weights files of one name (every DINO training checkpoint is checkpoint.pth) in two folders:
    the second backbone gets its own features, not the first one's from the cache."""
    args = centralized.get_args(FAST + ["--data-dir", str(tmp_path / "data")])
    args.precision, args.no_pretrained = "off", False  # features are cached only for real weights
    data = common.load_data(args)
    feats = []
    for folder, seed in (("a", 0), ("b", 1)):
        model = tiny_model(seed)
        os.makedirs(tmp_path / folder)
        args.weights = str(tmp_path / folder / "checkpoint.pth")
        torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, args.weights)
        feats.append(common.cached_features(model, data, args, torch.device("cpu"))["val"][0])
        fresh = common.extract_features(model, data["val"][0], args, torch.device("cpu"))
        assert torch.equal(feats[-1], fresh), f"--weights {folder}/checkpoint.pth got another backbone's features"
    assert not torch.equal(feats[0], feats[1])
    again = common.cached_features(model, data, args, torch.device("cpu"))["val"][0]  # the cache is still used
    assert torch.equal(again, feats[1])
    assert len(os.listdir(tmp_path / "data" / "features")) == 6  # 3 splits x 2 backbones
