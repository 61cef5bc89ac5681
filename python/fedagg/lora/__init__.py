"""LoRA adapters aggregated with any fedagg rule (aggregator.py: modes "factors", "exact",
"stacked"; bench.py: the timing of a 7B-shaped adapter set, ``fedagg bench --sections lora``).
The participant's side for Hugging Face peft models is fedagg.integrations.peft."""

from .aggregator import MODES, LoraAggregator, LoraResult

__all__ = ["MODES", "LoraAggregator", "LoraResult"]
