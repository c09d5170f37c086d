"""The demo's one entry: its settings, its world and components, then the trainer every real run uses.

`prepare(overrides, stage)` is what `recipes/finetune.py` and `recipes/pretrain.py` hand to
`fastllava.train.main` for a command line without --config: it reads demo/finetune.yaml (or pretrain.yaml)
with the command line's `section.key=value` overrides, generates the world (demo/world.py) and the tower and
LLM it starts from (demo/components.py), and points the ordinary configuration at them. `train.main` then
calls the same `train()` as every real run, and after stage 2 the returned `after` scores the model on the
held-out questions (demo/score.py) and prints a chat command for one of them. The demo's own knobs are
DemoSettings' fields (the `demo.*` keys); its YAML files hold only ordinary sections.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..config import Config, merge_config, to_config, usage
from ..data.files import IMAGE_TAG
from ..generate.inputs import load_model
from ..model.config import TextConfig, VisionConfig
from ..train.distributed import DistEnv, barrier, init_distributed
from .components import make_components
from .score import evaluate_vqa
from .world import DemoPaths, make_demo_dataset

HERE = Path(__file__).parent
CONFIGS = {"finetune": HERE / "finetune.yaml", "align": HERE / "pretrain.yaml"}
# What the demo makes itself; an override of these is a user who meant to train on their own data.
OWNED = ("model.source", "model.vision_path", "model.llm_path", "model.pretrained_path", "model.tokenizer_path",
         "model.architecture.vision", "model.architecture.text", "data.data_path", "data.image_folder")
# What prepare() points at the world and components it makes (the sizes are demo.vision and demo.text).
MADE = ("model.vision_path", "model.llm_path", "data.data_path", "data.image_folder")


def _tiny_tower() -> VisionConfig:
    return VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        image_size=112, patch_size=28)


def _tiny_llm() -> TextConfig:
    return TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=1024)


@dataclass
class DemoSettings:
    """The demo's own knobs, the `demo.*` keys: their one home (the YAML files hold the run's ordinary
    sections). Sizes and hyperparameters are the ones to tune (docs/demo.md)."""

    seed: int = 0  # the world, and the tower's and the LLM's initialization
    samples: int = 8000  # training conversations (the stage-1 captions are their images)
    eval_samples: int = 200  # held-out images and text questions
    # Of the conversations, text-only (sums of two numbers, no image); 0.1 left sums at 87-96% held-out.
    text_fraction: float = 0.2
    vision: VisionConfig = field(default_factory=_tiny_tower)  # the tower, CLIP-style but tiny
    text: TextConfig = field(default_factory=_tiny_llm)  # the LLM; vocab_size comes from the tokenizer
    # Contrastive pretraining of the tower, the stand-in for CLIP's (docs/demo.md; 0: a random tower).
    tower_steps: int = 1500
    tower_batch: int = 128
    tower_lr: float = 2e-3
    max_new_tokens: int = 16  # held-out answers
    eval_limit: int | None = None  # score only the first N held-out samples

    def __post_init__(self):
        if self.samples < 1 or self.eval_samples < 1:
            raise ValueError(f"demo.samples and demo.eval_samples must be >= 1, got {self.samples}, {self.eval_samples}")
        if self.tower_steps < 0 or self.tower_batch < 2 or self.tower_lr <= 0:
            raise ValueError(f"demo.tower_*: need steps >= 0, batch >= 2 and lr > 0; got {self.tower_steps}, "
                             f"{self.tower_batch}, {self.tower_lr}")


@dataclass
class DemoConfig(Config):
    """A run's configuration plus the demo's section."""

    demo: DemoSettings = field(default_factory=DemoSettings)


def refuse_owned(overrides: list[str], stage: str) -> None:
    """An override of what the demo makes itself is an error that says how to train on one's own data."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if any(key == k or key.startswith(k + ".") for k in OWNED):
            recipe = "finetune" if stage == "finetune" else "pretrain"
            raise ValueError(
                f"{key}: without --config, recipes/{recipe}.py runs the embedded demo, which makes its own data and "
                f"model and cannot take {key}. To train on your own data, give a configuration, e.g.\n"
                f"  torchrun recipes/{recipe}.py --config recipes/configs/llava15_7b_{recipe}.yaml "
                f"data.data_path=FILE.json data.image_folder=DIR\n"
                f"(README, 'Training LLaVA-1.5 for real'). The demo's own knobs are its demo.* keys (--help).")


def help_text(overrides: list[str], stage: str) -> str:
    """--help without --config: every key with the value the demo will run (its YAML and the command line
    over the defaults; the paths it makes itself named as such)."""
    refuse_owned(overrides, stage)
    shown = OmegaConf.to_container(merge_config(CONFIGS[stage], overrides, schema=DemoConfig))
    for key in MADE:
        section, name = key.split(".")
        shown[section][name] = "<made by the demo>"
    shown["demo"]["text"]["vocab_size"] = "<the tokenizer's, rounded up to 64>"  # components.py sets it
    where = f"fastllava/demo/{CONFIGS[stage].name}{' and the command line' if overrides else ''} over the defaults"
    return (f"Without --config the embedded demo runs; demo.* are its own keys (DemoSettings, "
            f"fastllava/demo/run.py).\n\n" + usage(shown, where))


def prepare(overrides: list[str], stage: str):
    """The demo's configuration, its world and components made, and what to do after training:
    (DemoConfig, after(result)). After stage 2, `after` scores the model on the held-out questions."""
    refuse_owned(overrides, stage)
    tree = merge_config(CONFIGS[stage], overrides, schema=DemoConfig)
    # Every section's values checked now, not after the minutes of making the world and the tower.
    settings: DemoSettings = OmegaConf.to_object(tree).demo
    env = init_distributed(tree.train.device)
    world = _world(settings, env)
    parts = make_components(settings, world, vision_feature_layer=tree.model.architecture.vision_feature_layer,
                            image_mode=tree.data.image_mode, env=env, show_progress=tree.logging.progress)
    tree.model.source = "components"
    data = world.train_json if stage == "finetune" else world.pretrain_json
    for key, path in zip(MADE, (parts.vision_dir, parts.llm_dir, data, world.image_folder)):
        OmegaConf.update(tree, key, str(path))
    cfg = to_config(tree)

    def after(result) -> dict | None:
        """The held-out scores (printed on rank 0) of a finished stage-2 run, from its export as a user
        would load it: each rank holds the whole model and answers its share of the questions. Then the
        command to talk to that model."""
        if stage != "finetune" or result.export is None:
            return None
        model, tokenizer = load_model(result.export, dtype="fp32", device=env.device.type)
        scores = evaluate_vqa(model, world.eval_json, world.image_folder, tokenizer,
                              cfg.data.template, image_mode=cfg.data.image_mode,
                              max_new_tokens=settings.max_new_tokens, max_samples=settings.eval_limit)
        if result.is_main:
            command, answer = chat_command(result.export, world, cfg.data.template)
            print(f"{scores['table']}\n\nAsk it yourself, about a held-out image (the reference answer: {answer}):\n"
                  f"  {command}", flush=True)
        return scores

    return cfg, after


def chat_command(export: Path, world: DemoPaths, template: str) -> tuple[str, str]:
    """(a `python -m fastllava.chat` command line, its reference answer): the exported model asked the first
    question of the first held-out image, worded as in training (the response-format line included: the
    tiny LLM answers well only in the wording it was trained on)."""
    sample = next(s for s in json.loads(world.eval_json.read_text()) if "image" in s)
    question, answer = (turn["value"] for turn in sample["conversations"][:2])
    args = ["python", "-m", "fastllava.chat", "--model", str(export), "--image", str(world.image_folder / sample["image"]),
            "--template", template, "--prompt", question.removeprefix(IMAGE_TAG + "\n"), "--temperature", "0"]
    return shlex.join(args), answer


def _world(settings: DemoSettings, env: DistEnv) -> DemoPaths:
    """Rank 0 generates (or finds) the world; the other ranks then find it."""
    kwargs = dict(n_train=settings.samples, n_eval=settings.eval_samples, seed=settings.seed,
                  text_fraction=settings.text_fraction)
    if env.is_main:
        make_demo_dataset(**kwargs)
    barrier()
    return make_demo_dataset(**kwargs)
