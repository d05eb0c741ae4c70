"""Each adapter type trains through PEFT and resumes exactly: k segments == 1 run, bitwise.

LoHa, LoKr, DoRA and LoCon (a LoRA on the resnet and sampler convolutions too) on
tiny-sd1: the same task split into segments of 2 steps ends with the same adapter,
optimizer moments and schedule bytes as one run of all steps. A changed adapter type is
refused when resuming, never half-loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.model.loading import add_lora_adapters, load_base_model, lora_parameters
from engine.task.definition import TaskDefinition
from tests.support.engine import checkpoint_bytes, make_task, run_chain

STEPS = 4
TYPES = {
    "loha": {"lora.type": "loha"},
    "lokr": {"lora.type": "lokr"},
    "dora": {"lora.type": "dora"},
    "locon": {"lora.conv": {"rank": 2, "alpha": 1.0}},
    "loha-conv": {"lora.type": "loha", "lora.conv": {"rank": 2}},
}
#: What each type's tensors are called in the checkpoint's PEFT file.
MARKS = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".lora_magnitude_vector",
         "locon": ".conv1.lora_A.weight", "loha-conv": ".conv1.hada_w1_a"}


def adapter_task(changes: dict, steps: int) -> TaskDefinition:
    return make_task(**{
        "lora.init_lora_weights": True, "train_args.max_train_steps": STEPS,
        "train_args.num_train_steps": steps, **changes,
    })


@pytest.mark.parametrize("kind", list(TYPES))
def test_segments_equal_one_run_bitwise_for_each_adapter_type(tmp_path: Path, kind: str) -> None:
    single = run_chain(adapter_task(TYPES[kind], STEPS), tmp_path / "one")
    chain = run_chain(adapter_task(TYPES[kind], 2), tmp_path / "split")

    assert [r.global_step for r in chain] == [2, 4]
    one, split = checkpoint_bytes(single[0].checkpoint), checkpoint_bytes(chain[-1].checkpoint)
    assert one == split
    tensors = load_tensors(one["lora"])
    assert any(MARKS[kind] in key for key in tensors)
    # trained: the factor PEFT starts at zero is no longer all zeros
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "hada_w2_a" in k
               or "lokr_w2" in k or "lora_B" in k)


def test_default_task_builds_the_same_lora_config_as_before() -> None:
    """No new field set: PEFT's plain LoraConfig, with no rank or alpha patterns."""
    from engine.model.loading import lora_config

    config = lora_config(make_task())
    assert type(config).__name__ == "LoraConfig"
    assert not config.use_dora and config.rank_pattern == {} and config.alpha_pattern == {}
    assert "type" not in make_task().stable_dump()["lora"]


def test_locon_adapts_convolutions_at_their_own_rank() -> None:
    task = adapter_task(TYPES["locon"], STEPS)
    base = load_base_model(task, torch.device("cpu"), with_vae=False, with_text=False)
    add_lora_adapters(base, task)
    params = lora_parameters(base.unet)
    conv = [p for n, p in params.items() if ".conv1.lora_A" in n]
    attn = [p for n, p in params.items() if ".to_q.lora_A" in n]
    assert conv and attn
    assert {p.shape[0] for p in conv} == {2} and {p.shape[0] for p in attn} == {4}
    assert any("downsamplers.0.conv.lora_A" in n for n in params)


def test_resuming_with_another_adapter_type_is_refused(tmp_path: Path) -> None:
    from engine.errors import LoraflowError
    from engine.train.segment import SegmentOptions, run_segment

    first = run_chain(adapter_task(TYPES["loha"], STEPS), tmp_path / "one")[0]
    other = adapter_task({"lora.type": "lokr"}, STEPS)
    with pytest.raises(LoraflowError):
        run_segment(other, str(tmp_path / "again"), SegmentOptions(checkpoint=first.checkpoint))


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_published_lycoris_file_names_its_network_for_the_loaders(tmp_path: Path,
                                                                  kind: str) -> None:
    import json

    from engine.lora.metadata import read_metadata
    from engine.lora.publish import publish_lora

    task = adapter_task(TYPES[kind], 2)
    result = run_chain(adapter_task(TYPES[kind], 2), tmp_path / "run")[-1]
    published = publish_lora(result.checkpoint, task, str(tmp_path / "out"), dataset_hash="d" * 64,
                             captions=[], validation_images=[], metrics_url=None,
                             run_summary={"run_name": kind})
    data = Path(published["kohya"]).read_bytes()
    header = read_metadata(data)
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"])["algo"] == {"loha": "loha", "dora": "lora"}[kind]
    keys = set(load_tensors(data))
    assert any(k.endswith(".hada_w1_a" if kind == "loha" else ".dora_scale") for k in keys)
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    # diffusers reads DoRA (PEFT keys) but not LoHa: only the LyCORIS file for LoHa
    assert (published["diffusers"] is None) == (kind == "loha")
