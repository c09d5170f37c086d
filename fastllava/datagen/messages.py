"""Prompt folders and the chat messages built from them.

A prompt folder follows LLaVA's layout (haotian-liu/LLaVA playground/data/prompts/<kind>/):

    system_message.txt     the system message
    000_caps.txt           an in-context example's context (captions, blank line, "category: [box]" lines)
    000_conv.txt           the answer the model should give for that context
    001_caps.txt, ...      more pairs, used in name order; a file without its partner is ignored

The messages for one image: the system message, then per example a user turn (its caps) and an assistant
turn (its conv), then a user turn with the image's context. Default folders for the three kinds ship in
fastllava/datagen/prompts/; our answers use the format validate.py parses (see there).

The question of a `detail` sample is not generated: it is drawn from DETAIL_INSTRUCTIONS, deterministically
per image id, as LLaVA draws it from the paper's list of detailed-description instructions (Table 9). The
brief-description samples that `--kind detail` also writes need no model at all: one of the image's own
captions answers an instruction drawn from BRIEF_INSTRUCTIONS, as the paper builds its caption data from
its list of brief-description instructions (Table 8).
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass

KINDS = ("conversation", "detail", "reasoning")
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

# Our wording of the paper's instructions for a detailed image description.
DETAIL_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Give a thorough description of this picture.",
    "What is happening in this image? Explain it in detail.",
    "Walk me through everything you can see in this image.",
    "Write a detailed account of the scene shown here.",
    "Describe the contents of the photo as fully as you can.",
    "Explain the visual content of the image with as much detail as possible.",
    "Provide an in-depth description of what the image shows.",
    "Tell me about this image, covering the objects, their places and what they are doing.",
    "Characterize the scene in the picture in detail.",
)

# Our wording of the paper's instructions for a brief image description.
BRIEF_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "Summarize what the image shows in one sentence.",
    "What does this photo show, in a few words?",
    "Write a concise caption for the image.",
    "Sum up the scene in the picture briefly.",
    "Offer a brief account of the image's content.",
    "In one sentence, what is in this image?",
    "Provide a compact summary of the photo.",
    "Caption this image.",
    "Briefly state what is pictured here.",
)


@dataclass(frozen=True)
class Prompt:
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, answer) pairs

    def messages(self, context: str) -> list[dict[str, str]]:
        """The chat-completions messages asking for one image with this `context`."""
        out = [{"role": "system", "content": self.system}]
        for caps, conv in self.examples:
            out += [{"role": "user", "content": caps}, {"role": "assistant", "content": conv}]
        out.append({"role": "user", "content": context})
        return out


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def load_prompt(folder: str) -> Prompt:
    """Read a prompt folder (layout above); ValueError when it has no system message."""
    system = os.path.join(folder, "system_message.txt")
    if not os.path.isfile(system):
        raise ValueError(f"prompt folder {folder!r} has no system_message.txt (layout: system_message.txt, "
                         "000_caps.txt + 000_conv.txt, ...)")
    examples = []
    for caps in sorted(glob.glob(os.path.join(folder, "*_caps.txt"))):
        conv = caps[: -len("_caps.txt")] + "_conv.txt"
        if os.path.isfile(conv):
            examples.append((_read(caps), _read(conv)))
    return Prompt(_read(system), tuple(examples))


def default_prompt_dir(kind: str) -> str:
    """The folder of our default prompts for `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return os.path.join(DEFAULT_DIR, kind)


def pick(options, image_id: str, purpose: str):
    """One of `options` for `image_id`: the same on every run and machine (a hash, not Python's salted
    hash() or a shared random generator, so a resumed run draws what an uninterrupted one would), and
    independent between purposes (the brief instruction does not decide the caption)."""
    digest = hashlib.sha256(f"{purpose}\0{image_id}".encode("utf-8")).digest()
    return options[int.from_bytes(digest[:8], "little") % len(options)]


def detail_instruction(image_id: str) -> str:
    """The instruction of `image_id`'s detail sample."""
    return pick(DETAIL_INSTRUCTIONS, image_id, "detail")
