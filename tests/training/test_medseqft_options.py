"""MedSeqFT options: defaults, checks, JSON round trip, and the objects they build."""
import json

import pytest

from nnunet_plugins.training.distillation import KLDistillation, LogitsMSE
from nnunet_plugins.training.masked_reconstruction import MaskedReconstruction
from nnunet_plugins.training.medseqft import MedSeqFTOptions


def test_defaults_build_the_documented_objects_and_round_trip():
    o = MedSeqFTOptions()
    assert (o.k, o.repeats, o.rank, o.lam, o.mu, o.kd, o.temperature) == (10, 5, 8, 1.0, 1.0, "kl", 2.0)
    assert o.objective() == MaskedReconstruction(0.6, 16, "zero", "mse")
    kd = o.kd_loss([0.6, 0.4])
    assert isinstance(kd, KLDistillation) and kd.temperature == 2.0 and kd.weights == [0.6, 0.4]
    assert isinstance(MedSeqFTOptions(kd="logits_mse").kd_loss(), LogitsMSE)
    custom = MedSeqFTOptions(k=3, mu=0.5, cube_size=0.25, mds_patches="sliding")
    assert MedSeqFTOptions.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


@pytest.mark.parametrize("kw,match", [
    ({"k": 0}, "k must be"), ({"repeats": 1.5}, "repeats"), ({"rank": True}, "rank"), ({"mu": -1}, "mu"),
    ({"kd": "cosine"}, "kd must"), ({"temperature": 0}, "temperature"), ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"fill": "blur"}, "fill"), ({"mds_patches": "random"}, "mds_patches"), ({"lora_alpha": 0}, "lora_alpha")])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MedSeqFTOptions(**kw)


def test_unknown_stored_option_is_an_error():
    with pytest.raises(ValueError, match="unknown MedSeqFT option"):
        MedSeqFTOptions.from_dict({"k": 3, "lambda": 1.0})
