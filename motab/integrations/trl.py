"""TRL's GKD trainer with the fused divergence: the same loss, no ``[tokens × vocab]`` logits.

``FusedGKDTrainer`` subclasses ``GKDTrainer`` and overrides only ``compute_loss``, the override
point the HF Trainer documents, so on-policy generation, sequence-level KD, data collation and
everything else stay TRL's. A patch of ``generalized_jsd_loss`` could not help: TRL's
``compute_loss`` has built both models' full logits before it calls the loss. The override reads
only ``self.teacher_model`` and ``self.beta``.

Matches TRL's ``compute_loss`` term for term: generalized JSD(β) with β=0/1 as forward/reverse
KL, labels shifted by one, ``-100`` masked, divided by the valid-token count or by
``num_items_in_batch``. TRL (≤ 1.16 at least) calls the loss at temperature 1.0, not at
``args.temperature`` (which only sets sampling); ``loss_temperature`` defaults to the same so the
two agree, and can be set to apply a temperature to the loss explicitly.

    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)
"""

from __future__ import annotations

from motab.integrations.hf import distillation_loss, tokenizer_size

SUPPORTED_TRL = ">=0.20,<2"

try:  # GKD moved to trl.experimental in TRL 1.x
    from trl.experimental.gkd import GKDTrainer
except ImportError:
    try:
        from trl import GKDTrainer
    except ImportError as error:
        raise ImportError(
            f"motab.integrations.trl needs TRL with GKDTrainer (supported: trl{SUPPORTED_TRL}); "
            "install it with pip install 'motab[trl]'"
        ) from error


class FusedGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose loss runs through ``motab_kernels.fused_linear_divergence``."""

    def __init__(self, *args, loss_temperature: float = 1.0, fused_impl: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for attribute in ("teacher_model", "beta"):
            if not hasattr(self, attribute):
                raise RuntimeError(
                    f"this TRL's GKDTrainer has no {attribute!r}; FusedGKDTrainer supports trl{SUPPORTED_TRL}"
                )
        self.loss_temperature = loss_temperature
        self.fused_impl = fused_impl

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = distillation_loss(
            model,
            self.teacher_model,
            inputs,
            kind="jsd",
            beta=self.beta,
            temperature=self.loss_temperature,
            num_items_in_batch=num_items_in_batch,
            impl=self.fused_impl,
            vocab_size=tokenizer_size(self),
        )
        return (out.loss, out) if return_outputs else out.loss
