"""Federated fine-tuning with PEFT LoRA adapters: a participant's side (``LoraParticipant``) for a
Hugging Face model wrapped by ``peft``, and the server's (``LoraAggregator``, from fedagg.lora,
which needs neither peft nor transformers).

    me = LoraParticipant(peft_model)              # a peft.PeftModel with a LoRA adapter
    me.load(res.adapters, res.scaling)            # this round's global adapters, any rank
    ...                                           # the user's training loop on peft_model
    update, scaling = me.update(), me.scaling     # what goes to the server, which runs
    res = LoraAggregator("exact", "multi_krum", f=2, rank=16).aggregate(updates, scalings=scalings)

An update is the adapter's tensors (clones), named as ``peft.get_peft_model_state_dict`` names them
(``...q_proj.lora_A.weight``), in the dtype the model holds them (bf16 too). ``load`` takes
adapters of another rank by rebuilding the adapter with that rank (scaling folded in: lora_alpha
= rank x scaling); PEFT's other settings (target modules, dropout) stay.
Needs the ``peft`` extra (peft, transformers, torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

from ..lora import LoraAggregator, LoraResult

__all__ = ["LoraAggregator", "LoraParticipant", "LoraResult"]

_A, _B = ".lora_A.weight", ".lora_B.weight"


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("fedagg.integrations.peft needs peft and transformers: pip install 'fedagg[peft]'") from e
    return peft


class LoraParticipant:
    """One participant's PEFT model with a LoRA adapter (``adapter``, default: the active one)."""

    def __init__(self, model: Any, adapter: Optional[str] = None):
        peft = _peft()
        if not isinstance(model, peft.PeftModel):
            raise TypeError(f"model must be a peft.PeftModel (get_peft_model(...)), got {type(model).__name__}")
        self.model = model
        self.adapter = adapter or model.active_adapter
        if self.adapter not in model.peft_config:
            raise ValueError(f"the model has no adapter {self.adapter!r} (it has {sorted(model.peft_config)})")
        cfg = model.peft_config[self.adapter]
        if cfg.peft_type != peft.PeftType.LORA:
            raise ValueError(f"adapter {self.adapter!r} is {cfg.peft_type}, not LoRA")
        if getattr(cfg, "use_dora", False):
            raise ValueError("DoRA adapters are not a product B A: LoraParticipant refuses them")
        if cfg.rank_pattern or cfg.alpha_pattern:
            raise ValueError("adapters with rank_pattern / alpha_pattern have a scaling per layer: not supported yet")

    @property
    def config(self):
        return self.model.peft_config[self.adapter]

    @property
    def scaling(self) -> float:
        """lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA): the update of a layer is scaling x B @ A."""
        c = self.config
        return float(c.lora_alpha) / (math.sqrt(c.r) if c.use_rslora else float(c.r))

    def update(self) -> Dict[str, Any]:
        """The adapter's tensors now, cloned (training goes on in place), named as PEFT names them."""
        sd = _peft().get_peft_model_state_dict(self.model, adapter_name=self.adapter)
        return {k: v.detach().clone() for k, v in sd.items()}

    def load(self, adapters: Mapping[str, Any], scaling: float = 1.0) -> None:
        """Make `adapters` (what ``update`` gives, or a LoraResult's ``adapters``, whose layers have
        update scaling x B @ A) this model's adapter. Another rank or scaling rebuilds the adapter."""
        peft = _peft()
        import torch

        if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"scaling must be a positive number, got {scaling!r}")
        mine = self.update()
        if set(adapters) != set(mine):
            missing, extra = sorted(set(mine) - set(adapters))[:3], sorted(set(adapters) - set(mine))[:3]
            raise ValueError(f"the adapters do not match this model's: missing {missing}, unexpected {extra}")
        ranks = {k[: -len(_A)]: int(v.shape[0]) for k, v in adapters.items() if k.endswith(_A)}
        same = all(tuple(adapters[k].shape) == tuple(v.shape) for k, v in mine.items())
        if same and math.isclose(scaling, self.scaling, rel_tol=1e-12):
            target = self.adapter
        else:
            target = self._rebuild(set(ranks.values()), scaling)
        params = {k: v.to(dtype=mine[k].dtype) if torch.is_tensor(v) else torch.as_tensor(v, dtype=mine[k].dtype)
                  for k, v in adapters.items()}
        result = peft.set_peft_model_state_dict(self.model, params, adapter_name=target)
        if result.unexpected_keys:
            raise ValueError(f"PEFT did not place {sorted(result.unexpected_keys)[:3]}")
        if target != self.adapter:
            self.model.set_adapter(target)
            self.model.delete_adapter(self.adapter)
            self.adapter = target

    def _rebuild(self, ranks, scaling: float) -> str:
        if len(ranks) != 1:
            raise ValueError(f"the adapters have several ranks {sorted(ranks)}: one rank per model is supported")
        (r,) = ranks
        old = self.config
        cfg = dataclasses.replace(old, r=r, lora_alpha=r * scaling, use_rslora=False, rank_pattern={},
                                  alpha_pattern={})
        base, k = self.adapter.split("_fedagg")[0], 0
        while f"{base}_fedagg{k}" in self.model.peft_config:
            k += 1
        name = f"{base}_fedagg{k}"
        self.model.add_adapter(name, cfg)
        return name
