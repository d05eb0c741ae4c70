"""``loraflow bench``: the smoke run's report, the FLOP counter, the full-size configs.

The smoke run times the real engine code (build_trainer + train_step over a SampleSource)
on tiny-sd1 at 64 px; it checks the report's shape, not its numbers, which depend on the
machine. One torch thread keeps it fast and steady on a busy CI host.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import bench
from engine.model.family import detect_family
from flows.cli import main
from flows.cli.bench import FAMILY_CHOICES, LEVER_CHOICES

TRAINING_ROW_KEYS = {
    "batch_size", "inputs", "levers", "status", "step_seconds", "samples_per_second",
    "samples_per_second_per_repeat", "peak_memory_bytes", "memory_before_bytes",
    "achieved_tflops", "mfu",
}


def test_smoke_bench_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    threads = torch.get_num_threads()
    code = main(["bench", "--smoke", "--threads", "1", "--json", str(out_json),
                 "--markdown", str(out_md)])
    assert code == 0
    assert torch.get_num_threads() == threads  # the bench gives the thread count back

    report = json.loads(out_json.read_text())
    assert report["schema"] == "loraflow-bench/1"
    assert {"date", "machine", "settings", "model", "flops", "cache_build", "training",
            "checkpoint_save", "restart", "notes", "command"} <= set(report)
    machine_keys = {"cpu", "torch", "torch_threads", "device", "load_average_start"}
    assert machine_keys <= set(report["machine"])
    assert report["machine"]["torch_threads"] == 1
    assert report["settings"]["family"] == "tiny-sd1" and report["settings"]["resolution"] == 64
    assert report["model"]["attention_processors"]
    assert report["model"]["lora_parameters"] > 0

    rows = report["training"]
    # 2 batch sizes x (cache, live, gradient_checkpointing, channels_last)
    assert len(rows) == 8
    for row in rows:
        assert set(row) == TRAINING_ROW_KEYS
        assert row["status"] == "ok" and row["samples_per_second"] > 0
        assert row["peak_memory_bytes"] >= row["memory_before_bytes"] > 0
        assert row["mfu"] is None  # a CPU has no peak to hold it against
    assert {(r["inputs"], tuple(r["levers"])) for r in rows} == {
        ("cache", ()), ("live", ()), ("cache", ("gradient_checkpointing",)),
        ("cache", ("channels_last",)),
    }

    flops = report["flops"]
    assert flops["train_step_per_sample"] > flops["unet_forward_per_sample"] > 0
    assert flops["encoding_per_sample"] > 0
    assert report["cache_build"]["images_per_second"] > 0
    assert report["checkpoint_save"]["seconds"] > 0 and report["checkpoint_save"]["bytes"] > 0
    restart = report["restart"]
    assert restart["seconds"] >= restart["first_step_seconds"] > 0
    assert restart["ratio_to_step"] > 0

    markdown = out_md.read_text()
    assert "| batch | inputs | levers | samples/s | step s | peak memory |" in markdown
    assert markdown.count("\n| 1 | ") == 4 and markdown.count("\n| 2 | ") == 4
    assert "segment restart" in markdown
    assert markdown in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_base():
    pipe = bench.build_pipeline("tiny-sd1")
    return bench.base_from_pipeline(pipe, torch.device("cpu"), torch.float32, "memory:tiny-sd1")


def _step_flops(base, batch_size: int) -> int:
    settings = bench.make_settings(smoke=True, batch_sizes=[batch_size])
    dataset = bench.SyntheticDataset(batch_size, settings.resolution)
    task = bench.bench_task(base.location, settings, batch_size)
    with bench.trainer_for(base, task, dataset, None, 1) as (trainer, batches, _):
        return bench.count_step_flops(trainer, batches)


def test_step_flops_are_positive_and_proportional_to_the_batch(tiny_base):
    one, two = _step_flops(tiny_base, 1), _step_flops(tiny_base, 2)
    assert one > 0
    assert two == pytest.approx(2 * one, rel=1e-6)


def test_flop_counter_counts_cpu_attention():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 4, 64, 16, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    with bench.flop_counter() as ours:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * 2 * 4 * 64 * 64 * 16  # Q @ K^T and P @ V
    assert plain.get_total_flops() == 0  # what torch alone misses on a CPU
    # backward: dV, dP, dQ, dK plus the recomputed Q @ K^T = 2.5 forwards (torch's formula)
    assert ours.get_total_flops() == forward + forward * 5 // 2


PUBLISHED = {
    # model: (UNet params, text encoder params, cross_attention_dim, family, prediction)
    "sd15": (859_520_964, [123_060_480], 768, "sd1", "epsilon"),
    "sd21": (865_910_724, [340_387_840], 1024, "sd2", "v_prediction"),
    "sdxl": (2_567_463_684, [123_060_480, 694_659_840], 2048, "sdxl", "epsilon"),
}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_full_size_configs_build_the_published_architectures(model):
    unet_params, text_params, cross_dim, family, prediction = PUBLISHED[model]
    with torch.device("meta"):  # architecture only: no 3-10 GB of weights
        modules = bench.build_modules(model)
    assert bench.parameter_count(modules["unet"]) == unet_params
    assert bench.parameter_count(modules["vae"]) == 83_653_863
    encoders = [modules[k] for k in ("text_encoder", "text_encoder_2") if k in modules]
    assert [bench.parameter_count(e) for e in encoders] == text_params
    assert modules["unet"].config.cross_attention_dim == cross_dim

    config = bench.load_bench_config(model)
    detected = detect_family(config["model_index"], config["unet"], config["scheduler"])
    assert (detected.name, detected.default_prediction_type) == (family, prediction)
    if model == "sdxl":
        unet = config["unet"]
        assert unet["addition_embed_type"] == "text_time"
        pooled = config["text_encoder_2"]["projection_dim"]
        time_embeds = 6 * unet["addition_time_embed_dim"]
        assert unet["projection_class_embeddings_input_dim"] == time_embeds + pooled
        hidden = [config[k]["hidden_size"] for k in ("text_encoder", "text_encoder_2")]
        assert sum(hidden) == cross_dim


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_engine_conditioning_fits_the_full_size_models(model):
    """encode_captions (with the stand-in tokenizers) feeds the full-size UNet: shapes on meta."""
    from engine.model.embedded.tiny_models import make_tokenizer
    from engine.model.family import encode_captions

    config = bench.load_bench_config(model)
    family = detect_family(config["model_index"], config["unet"], config["scheduler"])
    with torch.device("meta"):
        modules = bench.build_modules(model)
    tokenizers = [make_tokenizer(config[k]["pad_token"])
                  for k in ("tokenizer", "tokenizer_2") if k in config]
    encoders = [modules[k] for k in ("text_encoder", "text_encoder_2") if k in modules]
    conditioning = encode_captions(family, tokenizers, encoders, ["a cat", "a dog"],
                                   torch.device("meta"))
    assert tuple(conditioning["prompt_embeds"].shape) == (2, 77, PUBLISHED[model][2])
    if family.is_sdxl:
        assert tuple(conditioning["pooled"].shape) == (2, 1280)


def test_meta_forward_flops_match_the_published_work_per_sample():
    # published: SD1.x at 512 ~0.84-0.89 TFLOP (MACs x 2, all ops); SDXL at 1024 ~6.8 TFLOP
    sd15 = bench.meta_forward_flops("sd15", 512)
    assert 0.78e12 < sd15 < 0.90e12
    assert bench.meta_forward_flops("sd15", 512, batch_size=2) == 2 * sd15
    assert 6.5e12 < bench.meta_forward_flops("sdxl", 1024) < 7.0e12


def test_cli_choices_match_the_engine():
    assert tuple(bench.FAMILIES) == FAMILY_CHOICES
    assert bench.LEVERS == LEVER_CHOICES


def test_device_peaks_and_utilisation():
    assert bench.peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == ("H100", 989e12)
    assert bench.peak_for_name("NVIDIA H100 PCIe", "bf16")[1] == 756e12
    assert bench.peak_for_name("NVIDIA L40S", "fp16")[0] == "L40S"
    assert bench.peak_for_name("NVIDIA H100 80GB HBM3", "no", tf32=True)[1] == 495e12
    assert bench.peak_for_name("Some Future GPU", "bf16") == (None, None)
    row = {"status": "ok", "samples_per_second": 100.0}
    result = bench.utilisation(row, int(2e12), 989e12)
    assert result["achieved_tflops"] == pytest.approx(200.0)
    assert result["mfu"] == pytest.approx(200e12 / 989e12)
    assert bench.utilisation({"status": "out of memory"}, int(2e12), 989e12)["mfu"] is None


def test_settings_refuse_unknown_names():
    with pytest.raises(ValueError, match="unknown family"):
        bench.make_settings(family="sd3")
    with pytest.raises(ValueError, match="unknown lever"):
        bench.make_settings(levers=["torch_compile"])
    smoke_full = bench.make_settings(family="sd15", smoke=True)
    assert smoke_full.restart is False and smoke_full.resolution == 512


def test_data_path_is_measured_beside_the_step_for_cache_and_live_inputs(tiny_base, tmp_path):
    from engine.bench.data_path import measure_data_path
    from engine.bench.report import data_path_lines

    settings = bench.make_settings(smoke=True, batch_sizes=[2], steps=2, warmup=1,
                                   data_path=[64])
    rows = measure_data_path(tiny_base, settings, tmp_path)

    assert [(r["inputs"], r["workers"]) for r in rows] == [
        ("cache", 0), ("cache", 2), ("live", 0), ("live", 2)]
    for row in rows:
        assert row["resolution"] == 64 and row["batch_size"] == 2
        assert row["data_path_samples_per_second"] > 0 and row["step_samples_per_second"] > 0
        assert row["training_samples_per_second"] > 0
        assert row["ratio"] == pytest.approx(
            row["data_path_samples_per_second"] / row["step_samples_per_second"])
    # the photos are decoded by the engine's own prepared dataset: JPEGs of mixed shapes
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == bench.data_path.PHOTO_COUNT
    table = data_path_lines(rows)
    assert table[0].startswith("| px | batch | inputs | workers | data path samples/s |")
    assert len(table) == 2 + len(rows)


def test_cli_data_path_option_takes_resolutions():
    from flows.cli import build_parser

    args = build_parser().parse_args(["bench", "--smoke", "--data-path", "64,256"])
    assert args.data_path == [64, 256]
    assert bench.make_settings(smoke=True, data_path=args.data_path).data_path == [64, 256]
    assert bench.make_settings(smoke=True).data_path == []
