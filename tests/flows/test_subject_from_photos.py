"""A subject from a few photos, as a user runs it: ``loraflow run`` (the real CLI, a child
process) on a zip of 8 photos without a single caption. The flow captions them (the
embedded tiny captioner, a trigger word in the caption template), generates 8 DreamBooth
class images with the base model, and trains a new token ``<sks>`` with the LoRA, in 3
segments that give the engine's one uninterrupted run bit for bit. Run again into the
same output it captions nothing and generates nothing, as its summary says. What it
publishes loads in diffusers: the kohya file with its bundled embedding, and the
textual-inversion file, the token's trained vector in both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.infer.pipeline import load_pipeline
from engine.lora.embeddings import load_kohya_with_embeddings, load_textual_inversions
from engine.model.new_tokens import init_token_ids
from engine.train.new_token_state import NEW_TOKENS_FILE
from tests.support.datasets import make_zip, png
from tests.support.engine import make_task, run_chain
from tests.support.flow import assert_same_lora, subprocess_env

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "<sks>"

#: The subject task: 32 px, 6 steps of batch 2, in 3 segments of 2 steps.
SUBJECT = {
    "model.name": "loraflow/tiny-sd1",
    "validation": {"prompt": f"a photo of {TOKEN} shape", "num_images": 1,
                   "num_inference_steps": 2},
    "train_args.resolution": 32,
    "train_args.batch_size": 2,
    "train_args.gradient_accumulation_steps": 1,
    "train_args.num_train_steps": 2,
    "train_args.max_train_steps": 6,
    "train_args.lr_scheduler": {"lr_scheduler": "constant", "lr_warmup_steps": 0},
    "transforms": {"center_crop": True, "random_flip": False},
    "captioning": {"backend": "transformers", "model": "loraflow/tiny-captioner",
                   "max_length": 6, "trigger": TOKEN, "class_name": "shape",
                   "caption_template": "a photo of {trigger} {class_name}, {caption}"},
    "dreambooth": {"class_prompt": "a photo of a shape", "num_class_images": 8,
                   "num_inference_steps": 2, "batch_size": 4},
    "lora.new_tokens": [{"token": TOKEN, "init_words": ["shape"], "learning_rate": 1e-2}],
}


def _photos_zip(path: Path) -> Path:
    """8 photos of 32 px, each its own colour, and no caption anywhere."""
    colours = [(40 + 25 * i, 200 - 20 * i, (90 * i) % 256) for i in range(8)]
    return make_zip(path, {f"photos/img{i}.png": png(32, 32, c) for i, c in enumerate(colours)})


def _loraflow_run(task_file: Path, root: Path, prefect_api: str) -> dict:
    """``loraflow run`` in a child process, into ``root``/run; its run summary."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(task_file),
         "--output-dir", str(root / "run"), "--data-dir", str(root / "data"),
         "--cache-dir", str(root / "cache"), "-q"],
        env=subprocess_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summaries = sorted((root / "run").rglob("lora/run_summary.json"),
                       key=lambda p: p.stat().st_mtime)
    return json.loads(summaries[-1].read_text())


@pytest.fixture(scope="module")
def subject(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("subject")
    archive = _photos_zip(root / "photos.zip")
    task = make_task(**SUBJECT, dataset={"url": archive.as_uri()})
    task_file = root / "task.json"
    task_file.write_text(task.model_dump_json(exclude_unset=True))
    first = _loraflow_run(task_file, root, prefect_api)
    second = _loraflow_run(task_file, root, prefect_api)
    return {"root": root, "task": task, "first": first, "second": second}


def test_every_photo_is_captioned_with_the_trigger_and_8_class_images_generated(
    subject: dict
) -> None:
    dataset = subject["first"]["dataset"]
    assert dataset["captions"]["captioned"] == 8
    assert dataset["captions"]["uncaptioned"] == []
    assert dataset["class_images"] == {"count": 8, "from_folder": 0, "generated": 8,
                                       "reused": 0}
    assert dataset["count"] == 16  # 8 photos + 8 class images
    (metadata,) = (subject["root"] / "data").rglob("metadata.jsonl")
    captions = [json.loads(line)["text"] for line in metadata.read_text().splitlines()]
    assert len(captions) == 8
    assert all(c.startswith(f"a photo of {TOKEN} shape, ") for c in captions)


def test_a_rerun_into_the_same_output_captions_and_generates_nothing(subject: dict) -> None:
    dataset = subject["second"]["dataset"]
    assert (dataset["captions"]["captioned"], dataset["captions"]["from_cache"]) == (0, 8)
    assert dataset["class_images"]["generated"] == 0
    assert dataset["class_images"]["reused"] == 8
    assert subject["second"]["global_step"] == 6


def test_the_published_summary_shows_captions_without_a_local_path(subject: dict) -> None:
    captions = subject["first"]["dataset"]["captions"]
    (subset,) = captions["subsets"].values()
    assert subset["captions_file"].endswith("/metadata.jsonl")
    assert len(subset["pairs"]) == 8 and all(p["caption"] for p in subset["pairs"])
    assert str(subject["root"]) not in json.dumps(subject["first"]["dataset"])


def test_three_segments_give_the_engine_single_run_bit_for_bit(
    subject: dict, tmp_path: Path
) -> None:
    single = subject["task"].model_copy(deep=True)
    single.train_args.num_train_steps = single.train_args.max_train_steps  # one segment
    (result,) = run_chain(single, tmp_path)
    flow_checkpoint = _final_checkpoint(subject["root"] / "run")
    assert_same_lora((flow_checkpoint / "pytorch_lora_weights.safetensors").read_bytes(),
                     (Path(result.checkpoint) / "pytorch_lora_weights.safetensors").read_bytes())
    assert ((flow_checkpoint / NEW_TOKENS_FILE).read_bytes()
            == (Path(result.checkpoint) / NEW_TOKENS_FILE).read_bytes())
    published = load_tensors(
        (subject["root"] / "run" / "lora" / "pytorch_lora_weights.safetensors").read_bytes())
    single_lora = load_tensors(
        (Path(result.checkpoint) / "pytorch_lora_weights.safetensors").read_bytes())
    assert published.keys() == single_lora.keys()
    assert all(torch.equal(published[k], v) for k, v in single_lora.items())


def _final_checkpoint(run: Path) -> Path:
    (finish,) = {p.parent for p in run.rglob("checkpoint/FINISH")} or {None}
    assert finish is not None, "no finished checkpoint in the flow's output"
    return finish


def test_the_token_embedding_is_published_trained_and_loads_in_diffusers(
    subject: dict
) -> None:
    task = subject["task"]
    lora = subject["root"] / "run" / "lora"
    ti_file = lora / "embeddings" / "sks.safetensors"
    trained = load_tensors(ti_file.read_bytes())["emb_params"]

    pipe, _, family = load_pipeline(task.model, torch.float32, safety_checker=False)
    init = init_token_ids(pipe.tokenizer, task.lora.new_tokens[0], "tokenizer")
    initial = pipe.text_encoder.get_input_embeddings().weight[init].double().mean(0).float()
    assert trained.shape == (1, initial.numel())
    assert not torch.equal(trained[0], initial)  # trained away from the words' mean

    load_textual_inversions(pipe, family, {TOKEN: ti_file.read_bytes()})
    row = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row, trained[0])

    (kohya_file,) = lora.glob("loraflow_*.safetensors")
    kohya = load_tensors(kohya_file.read_bytes())
    assert torch.equal(kohya[f"bundle_emb.{TOKEN}.string_to_param.*"], trained)
    fresh, _, _ = load_pipeline(task.model, torch.float32, safety_checker=False)
    load_kohya_with_embeddings(fresh, family, kohya_file.read_bytes())
    row = fresh.text_encoder.get_input_embeddings().weight[
        fresh.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row, trained[0])
    image = fresh(f"a photo of {TOKEN} shape", num_inference_steps=1, height=32, width=32,
                  output_type="np").images[0]
    assert image.shape == (32, 32, 3)


# -- the README's walkthrough, its commands as written -----------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Train a subject from a few photos"


def _readme_commands() -> list[str]:
    """Each bash block of the README's subject section, its lines joined at ``\\``."""
    text = README.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    return [b.replace("\\\n", " ") for b in blocks]


def _shell(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-euc", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{block}\n{done.stderr[-4000:]}"
    return done


def test_the_readme_walkthrough_runs_as_written(prefect_api: str, tmp_path: Path) -> None:
    from tests.support.chat_server import ChatServer, ok

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "examples").symlink_to(root / "examples")
    (tmp_path / "photos").mkdir()
    for i in range(8):
        (tmp_path / "photos" / f"rex{i}.png").write_bytes(png(64, 64, (30 * i, 180, 90)))
    env = subprocess_env(PREFECT_API_URL=prefect_api, LORAFLOW_QUIET="1",
                         LORAFLOW_HOME=str(tmp_path / "home"))  # a new user's: nothing made yet
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's `loraflow`
    walkthrough, api = _readme_commands()

    out = _shell(walkthrough, tmp_path, env).stdout
    assert "captions: 8 captioned now" in out and "8 generated now" in out
    assert "embeddings/sks.safetensors (<sks>)" in out
    edited = json.loads((tmp_path / "runs/subject-edited/lora/run_summary.json").read_text())
    assert edited["dataset"]["captions"]["kept"] == 8  # trained from the reviewed captions
    assert edited["dataset"]["class_images"]["generated"] == 0

    canary = "sk-canary-readme-7f3a"
    with ChatServer(api_key=canary, default=ok("a brown dog on grass")) as server:
        api = api.replace("https://api.openai.com/v1", server.base_url)  # loopback, not a URL
        done = _shell(api.replace("export OPENAI_API_KEY=...", f"export OPENAI_API_KEY={canary}"),
                      tmp_path, env)
        assert len(server.requests) == 8
    summary = json.loads((tmp_path / "runs/subject-api/lora/run_summary.json").read_text())
    assert summary["dataset"]["captions"]["captioned"] == 8
    written = [p.read_bytes() for p in (tmp_path / "runs/subject-api").rglob("*") if p.is_file()]
    assert canary not in done.stdout + done.stderr
    assert not any(canary.encode() in data for data in written)
