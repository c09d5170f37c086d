"""`python -m fastllava.chat --model DIR [--image PATH ...] [--prompt TEXT]`: talk to a trained model.

A multi-turn conversation in the template the model was trained in (its export's fastllava.json; vicuna_v1,
LLaVA-1.5's, for a directory that names none), the images in the first user turn as LLaVA's own CLI puts
them, the answer streamed token by token. With --prompt it answers once and exits (for scripts); otherwise it
reads user turns from standard input until an empty line, "exit" or EOF.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence, TextIO

from .data.files import IMAGE_TAG
from .data.templates import TEMPLATES, get_template
from .generate import Generator
from .generate.inputs import StreamDecoder, image_processor, load_model, make_prompt, model_template


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastllava.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="llava-hf model directory with its tokenizer")
    parser.add_argument("--image", action="append", default=[], help="an image for the first turn (repeatable)")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES), help="conversation template (default: the one the model was "
                                                         "trained in, as its fastllava.json records; else vicuna_v1)")
    # LLaVA's CLI defaults (llava/serve/cli.py): temperature 0.2, 512 new tokens.
    parser.add_argument("--temperature", type=float, default=0.2, help="0 for greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    for image in args.image:
        if not Path(image).is_file():
            parser.error(f"--image {image}: no such file")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    try:  # unknown names fail here, before the model loads
        args.template = model_template(args.model, args.template)
        get_template(args.template)
    except ValueError as e:
        parser.error(f"--template: {e}")
    return args


class Chat:
    """A conversation with one model: `reply(text, out)` streams the answer to `out` and returns it.
    processor: how its images are preprocessed (generate.inputs.image_processor); default its tower family's."""

    def __init__(self, model, tokenizer, images: Sequence[str], args: argparse.Namespace, processor=None):
        self.model, self.tokenizer, self.images, self.args = model, tokenizer, list(images), args
        self.turns: list[dict] = []
        self.stop = get_template(args.template).stop_ids(tokenizer)  # where an answer ends (templates.py)
        self.processor = processor or image_processor(model.config)

    def reply(self, text: str, out: TextIO) -> str:
        first = not self.turns
        self.turns.append({"from": "human", "value": ((IMAGE_TAG + "\n") * len(self.images) if first else "") + text})
        prompt = make_prompt(self.turns, self.images, self.tokenizer, self.model, self.args.template, self.processor)
        decoder, answer = StreamDecoder(self.tokenizer), ""
        events = Generator(self.model, max_batch_size=1).stream(
            [prompt], max_new_tokens=self.args.max_new_tokens, stop=self.stop,
            temperature=self.args.temperature, top_p=self.args.top_p, seed=self.args.seed + len(self.turns))
        for event in events:
            piece = decoder.push(event.tokens)
            answer += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        answer = answer.strip()
        self.turns.append({"from": "gpt", "value": answer})
        return answer


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        chat = Chat(model, tokenizer, args.image, args, processor=image_processor(model.config, args.model))
        if args.prompt is not None:
            chat.reply(args.prompt, sys.stdout)
            return 0
        while True:
            try:
                text = input("USER: ")
            except EOFError:
                print()
                return 0
            if text.strip() in ("", "exit"):
                return 0
            sys.stdout.write("ASSISTANT: ")
            chat.reply(text, sys.stdout)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
