"""Models: building and loading (`loading`), chat templates and where responses end (`templates`), the one
log-prob path (`logps`), sampling (`sampling`) and the scalar-head model behind reward and value models
(`scalar_head`)."""
from dpo_exp.distributed import find_blocks
from dpo_exp.models.loading import (AdapterDisabled, apply_lora, autocast, disable_dropout, freeze,
                                    load_model, load_tokenizer, new_model, resolve_device, torch_dtype,
                                    train_tokenizer)
from dpo_exp.models.logps import PairLogps, SequenceLogps, logps_of_samples, sequence_logps
from dpo_exp.models.sampling import Samples, sample
from dpo_exp.models.scalar_head import ScalarHeadModel, make_value_model
from dpo_exp.models.templates import TEMPLATES, ChatTemplate, stop_token_ids

__all__ = ["AdapterDisabled", "apply_lora", "autocast", "disable_dropout", "find_blocks", "freeze", "load_model",
           "load_tokenizer", "new_model", "resolve_device", "torch_dtype", "train_tokenizer", "PairLogps", "SequenceLogps",
           "logps_of_samples", "sequence_logps", "Samples", "sample", "ScalarHeadModel", "make_value_model", "TEMPLATES",
           "ChatTemplate", "stop_token_ids"]
