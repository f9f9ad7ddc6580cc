#!/usr/bin/env python3
"""check_layers.py: the include layers of src/ (docs/architecture.md) as a test.

Reads every `#include "..."` of src/ and include/mlm/, resolves it to a file, and fails, naming FILE:LINE, on
  - an include that runs against the declared order (a lower layer including a higher one),
  - an include between two folders of the same layer (peers never include each other),
  - a cycle between folders or between headers,
  - a header this script does not place (a new include/mlm/*.h: add it to HEADER_HOME),
  - an include it cannot resolve.
A header of include/mlm/ belongs to the folder whose sources implement it (HEADER_HOME); a header inside a folder
belongs to that folder. System headers (<...>) are not checked.

  python3 tools/check_layers.py [--root DIR]   # exit 0: the layers hold; 1: violations listed
  python3 tools/check_layers.py --self-test    # plants an upward include and a cycle in a copy; both must be caught
"""
import argparse
import os
import re
import shutil
import sys
import tempfile

# Lowest first. A folder may include its own files and those of any lower layer, nothing else.
LAYERS = [
    ("common", ["src/host/common"]),
    ("formats", ["src/host/formats"]),
    ("data", ["src/host/data"]),
    ("model", ["src/host/model"]),
    ("backends", ["src/cpu", "src/kernels", "src/host/parallel"]),
    ("training", ["src/host/training"]),
    ("commands", ["src/host/commands"]),
]

# include/mlm/*.h and the shared headers at src/'s top: the folder of the sources that implement them.
HEADER_HOME = {
    "include/mlm/common.h": "src/host/common",
    "include/mlm/json.h": "src/host/formats",
    "include/mlm/safetensors.h": "src/host/formats",
    "include/mlm/config.h": "src/host/formats",
    "include/mlm/data.h": "src/host/data",
    "include/mlm/rng.h": "src/host/data",
    "include/mlm/mask.h": "src/host/data",
    "include/mlm/shards.h": "src/host/data",
    "include/mlm/wordpiece.h": "src/host/data",
    "include/mlm/wordpiece_train.h": "src/host/data",
    "include/mlm/curand_check.h": "src/host/data",
    "include/mlm/input_files.h": "src/host/data",
    "include/mlm/text_pieces.h": "src/host/data",
    "src/mask_rule.h": "src/host/data",   # the masking rule, shared by mask.c and the mask kernel
    "src/cpu_isa.h": "src/host/common",  # whether this CPU and OS run AVX2 / AVX-512 code: the GEMM, vexp.c, the wide Philox
    "src/keep_bits.h": "src/host/common",  # the packed dropout keep mask, shared by the CPU dropout and the kernels
    "src/philox_cpu.h": "src/host/data",  # cuRAND's Philox on the CPU, shared by rng.c, the CPU dropout and the kernels
    "include/mlm/model.h": "src/host/model",
    "include/mlm/optim.h": "src/host/model",
    "include/mlm/weights.h": "src/host/model",
    "include/mlm/checkpoint.h": "src/host/model",
    "include/mlm/hf_bert.h": "src/host/model",
    "include/mlm/cpu.h": "src/cpu",
    "include/mlm/cpu_threads.h": "src/cpu",
    "include/mlm/bf16.h": "src/host/data",  # the BF16 rounding rules over the Philox ROUND stream (header-only, host and
                                            # device, like philox_cpu.h): shared by src/cpu/bf16.c and src/kernels/bf16.cu
    "include/mlm/cuda_backend.h": "src/kernels",
    "include/mlm/cuda_model.h": "src/kernels",
    "include/mlm/dist.h": "src/host/parallel",
    "include/mlm/nccl_dp.h": "src/host/parallel",
    "include/mlm/reducer.h": "src/host/parallel",
    "include/mlm/agree.h": "src/host/parallel",
    "include/mlm/run_lock.h": "src/host/training",
    "include/mlm/train.h": "src/host/training",
    "include/mlm/backend.h": "src/host/training",
    "include/mlm/step.h": "src/host/training",
    "include/mlm/agree_ranks.h": "src/host/training",
    "include/mlm/commands.h": "src/host/commands",
    "include/mlm/report.h": "src/host/commands",
}

SOURCE_EXT = (".c", ".h", ".cu", ".cuh")
INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def order_line():
    return " < ".join(name for name, _ in LAYERS)


def folder_layer():
    return {folder: i for i, (_, folders) in enumerate(LAYERS) for folder in folders}


def source_files(root):
    out = []
    for top in ("src", "include"):
        for d, _, files in os.walk(os.path.join(root, top)):
            out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(SOURCE_EXT)]
    return sorted(out)


def home_of(path, layers):
    """The folder a file belongs to, or None."""
    if path in HEADER_HOME:
        return HEADER_HOME[path]
    d = os.path.dirname(path)
    return d if d in layers else None


def resolve(root, includer, name):
    """The file `#include "name"` names: beside the includer, then under src/, then under include/."""
    for base in (os.path.dirname(includer), "src", "include"):
        cand = os.path.normpath(os.path.join(base, name))
        if os.path.isfile(os.path.join(root, cand)):
            return cand
    return None


def find_cycles(edges):
    """Cycles of a graph {node: {succ: evidence}}, each as a list of nodes (one per strongly connected set)."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, {}):
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def check(root):
    layers = folder_layer()
    errors = []
    folder_edges, header_edges = {}, {}
    for path in source_files(root):
        mine = home_of(path, layers)
        if mine is None:
            where = "add it to HEADER_HOME" if path.startswith("include/") or os.path.dirname(path) == "src" else \
                "add its folder to LAYERS"
            errors.append(f"{path}:1: not placed in any layer ({where} in tools/check_layers.py and docs/architecture.md)")
            continue
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        for no, line in enumerate(lines, 1):
            m = INCLUDE_RE.match(line)
            if not m:
                continue
            target = resolve(root, path, m.group(1))
            if target is None:
                errors.append(f'{path}:{no}: #include "{m.group(1)}" names no file under src/ or include/')
                continue
            theirs = home_of(target, layers)
            if theirs is None:
                continue  # reported where the unplaced file itself is checked
            if path.endswith((".h", ".cuh")) and target.endswith((".h", ".cuh")):
                header_edges.setdefault(path, {})[target] = f"{path}:{no}"
            if theirs == mine:
                continue
            folder_edges.setdefault(mine, {}).setdefault(theirs, f"{path}:{no}")
            lm, lt = layers[mine], layers[theirs]
            if lt > lm:
                errors.append(f'{path}:{no}: #include "{m.group(1)}" runs upward: {mine} (layer {LAYERS[lm][0]}) '
                              f'includes {target} of {theirs} (layer {LAYERS[lt][0]}); order: {order_line()}')
            elif lt == lm:
                errors.append(f'{path}:{no}: #include "{m.group(1)}": {mine} and {theirs} are peers in layer '
                              f'{LAYERS[lm][0]} and must not include each other')
    for kind, edges in (("folders", folder_edges), ("headers", header_edges)):
        for cyc in find_cycles(edges):
            members = set(cyc)
            where = [f"{a} -> {b} at {ev}" for a in cyc for b, ev in sorted(edges.get(a, {}).items()) if b in members]
            errors.append(f"include cycle between {kind} {', '.join(cyc)}: " + "; ".join(where))
    doc = os.path.join(root, "docs", "architecture.md")
    if os.path.isfile(doc) and order_line() not in open(doc, encoding="utf-8").read():
        errors.append(f"docs/architecture.md:1: does not state the layer order `{order_line()}` that this script checks")
    return errors


def self_test():
    """An upward include and a folder cycle planted in a copy must each be reported with their file:line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        for top in ("src", "include", "docs"):
            shutil.copytree(os.path.join(root, top), os.path.join(tmp, top))
        base = check(tmp)
        if base:
            print("self-test: the unmodified tree already fails:\n  " + "\n  ".join(base))
            return 1
        data_c = os.path.join(tmp, "src/host/data/data.c")
        with open(data_c) as f:
            lines = f.read().split("\n")
        at = next(i for i, l in enumerate(lines) if l.startswith("#include")) + 1
        lines.insert(at, '#include "mlm/train.h"')
        with open(data_c, "w") as f:
            f.write("\n".join(lines))
        errs = check(tmp)
        want = f"src/host/data/data.c:{at + 1}: #include \"mlm/train.h\" runs upward"
        ok = any(e.startswith(want) for e in errs)
        print(("caught" if ok else "MISSED") + ": planted upward include; the checker said:\n  " + "\n  ".join(errs))
        # A cycle at one layer: two peers including each other (each edge also a peer violation).
        with open(data_c, "w") as f:
            f.write("\n".join(l for l in lines if l != '#include "mlm/train.h"'))
        for src, inc in (("src/cpu/threads.c", "mlm/dist.h"), ("src/host/parallel/dist.c", "mlm/cpu_threads.h")):
            p = os.path.join(tmp, src)
            with open(p) as f:
                text = f.read()
            with open(p, "w") as f:
                f.write(f'#include "{inc}"\n' + text)
        errs2 = check(tmp)
        cyc = any(e.startswith("include cycle between folders") and "src/cpu/threads.c:1" in e and
                  "src/host/parallel/dist.c:1" in e for e in errs2)
        print(("caught" if cyc else "MISSED") + ": planted cycle between src/cpu and src/host/parallel:\n  " +
              "\n  ".join(errs2))
        return 0 if ok and cyc else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    errors = check(args.root)
    for e in errors:
        print(e)
    n = len(source_files(args.root))
    print(f"{len(errors)} violation(s) in {n} files; layers: {order_line()}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
