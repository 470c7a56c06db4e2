"""`edgecpm inspect`: what a checkpoint or bundle folder holds, without loading its weights.

`inspect_info(path, kv_budget)` reads config.json and the safetensors headers (a checkpoint) or
manifest.json (a bundle) and returns a JSON-able dict; `sections(info)` turns it into titled
(label, value) rows and `print_report(info)` prints them (rich tables on a terminal, plain text
otherwise). Never imports torch; a checkpoint's ternary report reads its linear weights with numpy.
A GPTQ / AWQ checkpoint's quantization is reported from config.json and the headers alone.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from edgecpm import dtypes
from edgecpm.config import ModelConfig
from edgecpm.errors import BundleError, CheckpointError, ConfigError
from edgecpm.safetensors_files import ST_FLOAT_DTYPES, StoredTensor, checkpoint_files, checkpoint_tensors


def inspect_info(path: str | Path, kv_budget: int | str = "1GiB") -> dict:
    """Everything `edgecpm inspect` shows, as a JSON-able dict."""
    from edgecpm.bundle import MANIFEST, is_bundle, read_manifest
    from edgecpm.kv_cache import parse_bytes

    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder; pass a checkpoint or bundle folder")
    budget = parse_bytes(kv_budget)
    manifest = None
    if path.is_dir() and is_bundle(path):
        manifest = read_manifest(path)
        if not isinstance(manifest.get("config"), dict):
            raise BundleError(f"{path / MANIFEST}: no model config in this manifest; re-export the bundle")
        cfg = ModelConfig.from_dict(manifest["config"], source=str(path / MANIFEST))
    else:
        cfg = ModelConfig.from_file(path)

    quantization = bundle_quant = head = None
    if manifest is not None:
        head = manifest.get("lm_head") or {"mode": "dense", "dtype": manifest.get("dtype", "fp32")}
        weights, notes = _bundle_weights(folder, manifest)
        section = manifest.get("ternary")
        ternary = {"ternary": bool(section), **{k: v for k, v in (section or {}).items() if k != "tensors"}}
        if isinstance(manifest.get("quantization"), dict):  # --quantize int8 / int4
            bundle_quant = {k: v for k, v in manifest["quantization"].items() if k != "tensors"}
    else:
        tensors = checkpoint_tensors(folder)
        quantization = _checkpoint_quantization(folder, tensors)
        weights, notes = _checkpoint_weights(folder, cfg, tensors, quantization)
        if quantization is not None and not quantization["supported"]:
            notes.append(f"quantization not supported: {quantization['reason']}")
        ternary = (_checkpoint_ternary(tensors, cfg) if weights["files"] and not notes and quantization is None
                   else None)

    kv_per_token = {name: cfg.kv_bytes_per_token(dtypes.ITEMSIZE[name]) for name in dtypes.NAMES}
    return {
        "path": str(path),
        "kind": "bundle" if manifest is not None else "checkpoint",
        "config": _config_facts(cfg),
        "params": cfg.n_params(),
        "weights": weights,
        "kv": {
            "bytes_per_token": kv_per_token,
            "budget_bytes": budget,
            # What fits in the budget; a session's arena is also capped at max_position_embeddings.
            "tokens_in_budget": {name: budget // per for name, per in kv_per_token.items()},
        },
        "ternary": ternary,
        "quantization": quantization,
        "weight_quantization": bundle_quant,
        "lm_head": head,
        "notes": notes,
    }


def _config_facts(cfg: ModelConfig) -> dict:
    return {
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "gqa_group": cfg.group_size,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "scale_emb": cfg.scale_emb,
        "scale_depth": cfg.scale_depth,
        "residual_scale": cfg.residual_scale,
        "dim_model_base": cfg.dim_model_base,
        "logit_divisor": cfg.logit_divisor,
        "max_position_embeddings": cfg.max_position_embeddings,
        "original_max_position_embeddings": cfg.original_max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_factor": ("long_factor" if cfg.max_position_embeddings > cfg.original_max_position_embeddings
                        else "short_factor"),
        "rope_factors_equal": cfg.long_factor == cfg.short_factor,
        "rope_attention_scale": cfg.rope_attention_scale,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_ids": list(cfg.eos_token_ids),
        "attention": "dense" if cfg.sparse is None else "infllmv2",
        "sparse_config": None if cfg.sparse is None else dataclasses.asdict(cfg.sparse),
    }


def _bundle_weights(folder: Path, manifest: dict) -> tuple[dict, list[str]]:
    files = [folder / name for name in manifest.get("files", {})]
    missing = [f.name for f in files if not f.exists()]
    weights = {
        "files": [f.name for f in files],
        "bytes_on_disk": sum(f.stat().st_size for f in files if f.exists()),
        "bundle": {k: manifest.get(k) for k in ("format_version", "dtype", "exporter", "created", "source")},
    }
    notes = [f"files listed in manifest.json but missing: {', '.join(missing)}"] if missing else []
    return weights, notes


def _checkpoint_weights(folder: Path, cfg: ModelConfig, tensors: dict[str, StoredTensor],
                        quantization: dict | None = None) -> tuple[dict, list[str]]:
    """Per-dtype bytes and element counts from the safetensors headers (weights are not read).
    A quantized checkpoint's parameters are the weights its tensors stand for, not the stored words."""
    files = checkpoint_files(folder)
    by_dtype: dict[str, dict] = {}
    for t in tensors.values():
        entry = by_dtype.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    n_elements = sum(t.numel for t in tensors.values())
    n_params = n_elements
    if quantization is not None and quantization["supported"]:
        n_params = quantization["weights"] + sum(t.numel for name, t in tensors.items()
                                                 if name.rsplit(".", 1)[0] + ".qweight" not in tensors)
    notes = []
    if not files:
        notes.append("no model.safetensors or model.safetensors.index.json: weights not inspected")
    elif cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        notes.append("lm_head.weight is present but the config ties embeddings (tie_word_embeddings absent/true)")
    elif not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        notes.append("lm_head.weight is missing but the config does not tie embeddings")
    if files and n_params != cfg.n_params():
        what = "weights" if n_params != n_elements else "elements"
        notes.append(f"the files hold {n_params} {what} but the config implies {cfg.n_params()} parameters")
    weights = {
        "files": [f.name for f in files],
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "tensors": len(tensors),
        "elements": n_elements,
        "by_dtype": by_dtype,
    }
    return weights, notes


def _checkpoint_quantization(folder: Path, tensors: dict[str, StoredTensor]) -> dict | None:
    """The GPTQ / AWQ quantization config.json declares and what the quantized linears cost on disk
    (headers only), or None for a float checkpoint."""
    from edgecpm.export.quantized import bits_per_weight, read_quant_config  # numpy only

    try:
        q = read_quant_config(folder, tensors)
    except CheckpointError as e:
        return {"supported": False, "reason": str(e)}
    if q is None:
        return None
    bases = sorted(name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight"))
    weights = stored = 0
    for base in bases:
        qweight, scales = tensors[base + ".qweight"], tensors.get(base + ".scales")
        n = scales.shape[-1] if scales is not None else qweight.shape[1] * (8 if q.method == "awq" else 1)
        k = qweight.shape[0] * (8 if q.method == "gptq" else 1)
        weights += n * k
        stored += sum(tensors[f"{base}.{s}"].nbytes for s in ("qweight", "qzeros", "scales", "g_idx")
                      if f"{base}.{s}" in tensors)
    linear = [n for n in tensors if n.endswith(".weight") and len(tensors[n].shape) == 2
              and n != "model.embed_tokens.weight"]
    return {
        "supported": True,
        "method": q.method,
        "bits": q.bits,
        "group_size": q.group_size,
        "sym": q.sym,
        "desc_act": q.desc_act,
        "checkpoint_format": q.checkpoint_format,
        "quantized_linears": len(bases),
        "float_linears": sorted(linear),
        "weights": weights,
        "stored_bytes": stored,
        "bits_per_weight": stored * 8 / weights if weights else 0.0,
        "bits_per_weight_nominal": bits_per_weight(q, 4096, 4096, with_g_idx=q.method == "gptq"),
    }


def _checkpoint_ternary(tensors: dict[str, StoredTensor], cfg: ModelConfig) -> dict:
    """BitCPM4 ternary detection on the linear weights, read straight from the safetensors files
    (numpy, no torch): the report export acts on."""
    from edgecpm.export.ternary import linear_names, report  # numpy only; a workstation entry point

    def tensor(name):  # float32 values
        t = tensors[name]
        if t.dtype not in ST_FLOAT_DTYPES:
            return np.full(t.shape, np.nan, np.float32)  # not a float weight: never ternary
        return t.read_float()

    return report(linear_names(cfg.num_hidden_layers), tensor)


# ---- rendering --------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def sections(info: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """`inspect_info`'s dict as titled sections of (label, value) rows."""
    c, w, kv = info["config"], info["weights"], info["kv"]
    sparse = "dense" if c["sparse_config"] is None else "InfLLM v2 " + ", ".join(
        f"{k}={v}" for k, v in c["sparse_config"].items())
    model = [
        ("layers", str(c["layers"])),
        ("hidden / intermediate", f"{c['hidden_size']} / {c['intermediate_size']}"),
        ("heads / kv heads / head_dim", f"{c['attention_heads']} / {c['kv_heads']} / {c['head_dim']}"),
        ("GQA group", str(c["gqa_group"])),
        ("vocab", str(c["vocab_size"])),
        ("tied embeddings", "yes" if c["tie_word_embeddings"] else "no"),
        ("rms_norm_eps", f"{c['rms_norm_eps']:g}"),
        ("scale_emb", f"{c['scale_emb']:g}"),
        ("residual scale", f"{c['residual_scale']:.6g} (scale_depth {c['scale_depth']:g} / sqrt({c['layers']}))"),
        ("logit divisor", f"{c['logit_divisor']:g} (hidden / dim_model_base {c['dim_model_base']:g})"),
        ("max positions", f"{c['max_position_embeddings']} (original {c['original_max_position_embeddings']})"),
        ("rope", (f"longrope, theta {c['rope_theta']:g}, {c['rope_factor']}"
                  f"{' (long == short)' if c['rope_factors_equal'] else ''}, "
                  f"scale {c['rope_attention_scale']:.4g}")),
        ("bos / eos", f"{c['bos_token_id']} / {c['eos_token_ids']}"),
        ("attention", sparse),
    ]
    weights = [("parameters (config)", f"{info['params']:,} ({info['params'] / 1e6:.1f} M)"),
               ("files", ", ".join(w["files"]) or "none"),
               ("bytes on disk", f"{w['bytes_on_disk']:,} ({human_bytes(w['bytes_on_disk'])})")]
    if "bundle" in w:
        b = w["bundle"]
        weights += [("bundle", f"format {b['format_version']}, dtype {b['dtype']}, {b['exporter']}, {b['created']}")]
    else:
        weights += [("tensors / elements", f"{w['tensors']} / {w['elements']:,}")]
        weights += [(f"  {dt}", f"{d['tensors']} tensors, {d['bytes']:,} bytes ({human_bytes(d['bytes'])})")
                    for dt, d in sorted(w["by_dtype"].items())]
    budget = human_bytes(kv["budget_bytes"])
    max_pos = c["max_position_embeddings"]
    cache = [(f"{dt}", f"{per:,} bytes/token, {kv['tokens_in_budget'][dt]:,} tokens in {budget}"
                       + (f" (a session holds at most max positions = {max_pos:,})"
                          if kv["tokens_in_budget"][dt] > max_pos else ""))
             for dt, per in kv["bytes_per_token"].items()]
    result = [("model", model), ("weights", weights), ("KV cache", cache)]
    if info["ternary"] is not None:
        result.append(("ternary (BitCPM4)", _ternary_rows(info["ternary"], info["kind"])))
    q = info.get("quantization")
    if q is not None and q["supported"]:
        result.append((f"quantization ({q['method'].upper()})", _quantization_rows(q)))
    if info.get("weight_quantization"):
        result.append(("weight quantization (int8 / int4)", _bundle_quant_rows(info["weight_quantization"])))
    if info.get("lm_head"):
        result.append(("embedding / LM head", _head_rows(info["lm_head"])))
    if info["notes"]:
        result.append(("notes", [("!", n) for n in info["notes"]]))
    return result


def _ternary_rows(t: dict, kind: str) -> list[tuple[str, str]]:
    if kind == "bundle" and not t["ternary"]:
        return [("linear weights", "dense")]
    if kind == "checkpoint" and t["count"] == 0:
        return [("linear weights", "not ternary: " + t["reason"])]
    state = "ternary" if t["ternary"] else "mostly not ternary"
    if kind == "bundle":
        state = "packed: " + ("2-bit codes, TernaryMatMul" if t["op"] == "TernaryMatMul"
                              else "4-bit codes, onnxruntime MatMulNBits (an older export)")
        state += {"int16": "; int16 activations on onnxruntime (logits ~1e-5 off)",
                  "int8": "; int8 activations on onnxruntime (lossy)"}.get(t.get("activations"), "")
    rows = [("linear weights", f"{t['count']} linear weights {state}"),
            ("granularity", ", ".join(t["scales"])),
            ("group sizes", ", ".join(map(str, t["group_sizes"]))),
            ("packed bytes", (f"{t['packed_bytes']:,} codes + {t['scale_bytes']:,} scales "
                              f"({t['bits_per_weight']:.3f} bits per weight)"))]
    if t.get("lossy"):
        rows.append(("lossy", f"{t['lossy']} tensors ternarized by --quantize ternary"))
    if "reason" in t:
        rows.append(("not ternary", f"{t['reason']} ({t['linears'] - t['count']} of {t['linears']})"))
    return rows


def _bundle_quant_rows(q: dict) -> list[tuple[str, str]]:
    groups = ", ".join("per row" if g == -1 else f"group {g}" for g in q["group_sizes"])
    sources = ", ".join({"rtn": "rtn (round to nearest)", "gptq": "gptq (its codes kept)",
                         "awq": "awq (its codes kept)"}.get(s, s) for s in q["sources"])
    rows = [("linear weights", f"{q['count']} linears {q['mode']}, QuantMatMul (onnxruntime: MatMulNBits, "
                               f"{q.get('activations', 'fp32')} activations)"),
            ("codes", f"{'/'.join(map(str, q['bits']))}-bit, {'symmetric' if q['sym'] else 'asymmetric'}, "
                      f"{groups} (blocks of {', '.join(map(str, q['block_sizes']))}), from {sources}"),
            ("stored bytes", (f"{q['code_bytes']:,} codes + {q['scale_bytes']:,} scales + {q['zero_bytes']:,} zeros "
                              f"for {q['weights']:,} weights ({q['bits_per_weight']:.3f} bits per weight)"))]
    if q.get("act_order"):
        rows.append(("act-order", f"{q['act_order']} linears gather their inputs in group order (GPTQ g_idx)"))
    return rows


def _head_rows(h: dict) -> list[tuple[str, str]]:
    if h["mode"] == "dense":
        return [("stored", f"dense, {h['dtype']}")]
    rows = [("stored", f"{h['mode']} codes, asymmetric, group {h['group_size']}: {h['bits_per_weight']:.3f} bits "
                       f"per weight; the LM head is a QuantMatMul, the embedding dequantizes the rows it gathers")]
    for name, t in h["tensors"].items():
        rows.append((name, f"{' x '.join(map(str, t['shape']))}: weights {t['weight_rel_error']:.2e} relative error; "
                           f"logits on {t['probes']} probe rows (its own rows as hidden states) "
                           f"{t['probe_logit_rel_error']:.2e} relative, top-1 agrees "
                           f"{100 * t['probe_top1_agreement']:.1f}%"))
    return rows


def _quantization_rows(q: dict) -> list[tuple[str, str]]:
    group = "-1 (per channel)" if q["group_size"] == -1 else str(q["group_size"])
    rows = [("method", f"{q['method'].upper()}, {q['bits']}-bit, checkpoint_format {q['checkpoint_format']}"),
            ("group size", group),
            ("sym / desc_act", f"{str(q['sym']).lower()} / {str(q['desc_act']).lower()}"),
            ("linear weights", f"{q['quantized_linears']} quantized"
                               + (f", {len(q['float_linears'])} float ({', '.join(q['float_linears'][:3])}"
                                  f"{', ...' if len(q['float_linears']) > 3 else ''})" if q["float_linears"] else "")),
            ("stored bytes", (f"{q['stored_bytes']:,} for {q['weights']:,} weights ({q['bits_per_weight']:.3f} bits "
                              f"per weight incl. scales, zeros{' and g_idx' if q['method'] == 'gptq' else ''}; "
                              f"{q['bits_per_weight_nominal']:.3f} at 4096x4096)")),
            ("runs as", "dequantized to float on load / export (no memory saving yet)")]
    return rows


def print_report(info: dict, file=None) -> None:
    """The sections as rich tables when `file` (default stdout) is a terminal, else as plain text."""
    file = file or sys.stdout
    if file.isatty():
        from rich.console import Console
        from rich.table import Table

        console = Console(file=file)
        for title, rows in sections(info):
            table = Table(title=title, show_header=False, title_justify="left")
            table.add_column(style="bold")
            table.add_column()
            for k, v in rows:
                table.add_row(k, v)
            console.print(table)
        return
    print(info["path"], file=file)
    for title, rows in sections(info):
        print(f"\n[{title}]", file=file)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}", file=file)
