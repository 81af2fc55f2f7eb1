"""Every initialization method sclora offers, one record each: what data it needs, on which side of the layers
its statistics are taken, its default normalization, whether it writes a residual, the function that builds it
and the PEFT initialization it must equal where PEFT has one.

The config (method names, default normalization), ``init_model`` (the builder), the statistics cache (which sets,
which side), the command line (``--method`` choices), the experiment runner and the docs' methods table all read
these records. Adding a method is one record here, its module in :mod:`sclora.methods` and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "METHOD_SPECS", "MethodSpec", "method_spec", "methods_table"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: a one-line description for help texts and the docs
    summary: str
    #: the builder, a function of :mod:`sclora.methods`: ``build(model, config, plus, minus, show_progress)``
    builder: str
    #: which data sets it reads: "plus" (D+, the fine-tuning data), "minus" (D-, the knowledge to keep)
    needs: tuple[str, ...] = ()
    #: what it reads them as: "statistics" (covariances, :func:`sclora.collect_covariances`) or "batches"
    data_form: str = "statistics"
    #: the side of the layers the statistics are taken on ("output": y = W x, "input": x); None: no statistics
    side: str | None = None
    #: the statistics normalization used when the config names none
    normalize: str = "none"
    #: True: W_res = W0 - s B0 A0 is written into the base weight (the export adds -B0 A0 back)
    residual: bool = False
    #: True: D- may be several knowledge sets, with one beta (or budget) each
    several_sets: bool = False
    #: the PEFT ``init_lora_weights`` value (and options) this method equals (tested), or None where PEFT has none
    peft: str | None = None
    #: what it is tested against where PEFT has no such init
    reference: str = ""
    #: whether a LoRA adapter is built (False: full fine-tuning)
    adapter: bool = True


METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("sc_lora", "SC-LoRA: the subspace of D+'s outputs that D-'s avoid (Algorithm 1)", "build_sc_lora",
               needs=("plus", "minus"), side="output", residual=True, several_sets=True,
               reference="the paper's Theorems 1-2 and Eq. 6-8 in float64"),
    MethodSpec("lora", "vanilla LoRA: Kaiming-uniform A, zero B", "build_lora", peft="True"),
    MethodSpec("pissa", "PiSSA: the top-r singular directions of W", "build_lora", residual=True, peft='"pissa"'),
    MethodSpec("olora", "OLoRA: the QR decomposition of W", "build_lora", residual=True, peft='"olora"'),
    MethodSpec("mica", "MiCA: B = the r minor left singular vectors of W (frozen), A = 0; only A trains",
               "build_lora", peft='"mica"'),
    MethodSpec("eva", "EVA: the top singular directions of D+'s layer inputs, ranks redistributed", "build_eva",
               needs=("plus",), data_form="batches", peft='"eva"'),
    MethodSpec("corda_ipa", "CorDA IPA: the first r components of W C (C: D+'s input covariance)", "build_corda",
               needs=("plus",), side="input", normalize="abs_of_max", residual=True, peft='"corda", corda_method="ipm"'),
    MethodSpec("corda_kpa", "CorDA KPA: the last r components of W C (C: D-'s input covariance)", "build_corda",
               needs=("minus",), side="input", normalize="abs_of_max", residual=True, peft='"corda", corda_method="kpm"'),
    MethodSpec("salora", "SaLoRA: a fixed module removing D-'s output directions, B0 on D+'s", "build_salora",
               needs=("plus", "minus"), side="output", residual=True,
               reference="the authors' code (a float64 rewrite of their formulas)"),
    MethodSpec("guardspace", "GuardSpace: CorDA KPA on D-'s input covariance, A's input projected on the null "
               "space of D-'s activations", "build_guardspace", needs=("minus",), side="input",
               normalize="abs_of_max", residual=True, several_sets=True,
               reference="the authors' code (a float64 rewrite of their formulas)"),
    MethodSpec("full", "full fine-tuning: every weight trains, no adapter", "build_full", adapter=False),
)}

METHODS = tuple(METHOD_SPECS)


def method_spec(name: str) -> MethodSpec:
    """The record of ``name``, or a ValueError that lists the methods."""
    try:
        return METHOD_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {METHODS}, got {name!r}.") from None


def methods_table() -> str:
    """The methods as a Markdown table (the docs' and README's methods table)."""
    rows = ["| method | what it does | data | statistics | tested equal to |", "|---|---|---|---|---|"]
    for s in METHOD_SPECS.values():
        data = ", ".join({"plus": "D+", "minus": "D-"}[n] for n in s.needs) or "none"
        stats = f"{s.side}-side, normalize={s.normalize}" if s.side else ("batches" if s.needs else "-")
        equal = f"PEFT `init_lora_weights={s.peft}`" if s.peft else (s.reference or "-")
        rows.append(f"| `{s.name}` | {s.summary} | {data} | {stats} | {equal} |")
    return "\n".join(rows)
