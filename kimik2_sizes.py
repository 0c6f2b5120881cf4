"""What a kimik2.py config costs, as a table: parameters (total, activated), the decoding cache and
the forward FLOPs per token, and what 128 heads instead of 64 would cost (K2 report, arXiv
2507.20534, sec. 2.3), for Kimi-K2 against DeepSeek-V3 or any preset or config.json. The arithmetic
is kimik2.py's (count_params, flops_per_token, kv_cache_bytes_per_token, heads_cost); this file
prints it. Needs torch and kimik2.py beside it.

Run:  python kimik2_sizes.py                       Kimi-K2 vs DeepSeek-V3 (python kimik2.py runs this)
      python kimik2_sizes.py --preset tiny --json  one preset (or --config path/to/config.json)
"""
import argparse
import json
import os

from kimik2 import PRESETS, Config, count_params, flops_per_token, heads_cost, kv_cache_bytes_per_token

CONTEXTS = {"4k": 4096, "128k": 131072}  # K2's pre-training context and its extended context


def size_report(config: Config) -> dict:
    report = dict(count_params(config))
    report["sparsity"] = config.n_routed_experts / config.num_experts_per_tok
    report["kv_cache_bytes_per_token_bf16"] = kv_cache_bytes_per_token(config)
    report["forward_flops_per_token"] = {name: flops_per_token(config, n) for name, n in CONTEXTS.items()}
    return report


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:,.0f}"


def _print_table(columns: dict):
    reports = {name: size_report(c) for name, c in columns.items()}
    rows = [("total params", lambda r: _human(r["total"])),
            ("activated (incl. embedding + head)", lambda r: _human(r["activated"])),
            ("activated (no input embedding)", lambda r: _human(r["activated_no_input_embedding"])),
            ("activated (no embedding, no head)", lambda r: _human(r["activated_no_embedding"])),
            ("sparsity (routed experts / active)", lambda r: f"{r['sparsity']:.0f}"),
            ("KV cache bytes/token, absorbed (bf16)", lambda r: f"{r['kv_cache_bytes_per_token_bf16']['absorbed']:,}"),
            ("KV cache bytes/token, full K/V (bf16)", lambda r: f"{r['kv_cache_bytes_per_token_bf16']['full']:,}")]
    rows += [(f"forward FLOPs/token at {name}", lambda r, name=name: _human(r["forward_flops_per_token"][name]))
             for name in CONTEXTS]
    print(f"{'':40s}" + "".join(f"{name:>16s}" for name in columns))
    for label, fmt in rows:
        print(f"{label:40s}" + "".join(f"{fmt(r):>16s}" for r in reports.values()))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Kimi-K2 / DeepSeek-V3 sizes, activations and FLOPs.")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--config", help="path to a Hugging Face config.json")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.preset or args.config:
        config = Config.from_json(args.config) if args.config else Config.from_preset(args.preset)
        columns = {args.preset or os.path.basename(args.config): config}
    else:
        columns = {"kimi-k2": Config.from_preset("kimi-k2"), "deepseek-v3": Config.from_preset("deepseek-v3")}
    k2 = columns.get("kimi-k2")
    if args.json:
        out = {name: size_report(c) for name, c in columns.items()}
        if k2 is not None:
            out["kimi-k2"]["heads_128_cost"] = heads_cost(k2, 128)
        print(json.dumps(out, indent=2))
        return
    _print_table(columns)
    print("Convention: total counts every parameter plus router biases; activated counts one token's "
          "path (num_experts_per_tok routed experts).\nFLOPs: 2 per multiply-add, matmuls plus naive-MLA "
          "attention over the context, for the token at the end of that context.")
    if k2 is not None:
        cost = heads_cost(k2, 128)
        print(f"Kimi-K2 with 128 instead of 64 heads at 128k context: {cost['end_of_context']:+.0%} "
              f"FLOPs/token at the end of the context, {cost['prefill_average']:+.0%} averaged over "
              f"the prefill (report: +83%).")


if __name__ == "__main__":
    main()
