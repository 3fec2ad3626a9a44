"""A checkpoint opened to be used (decode, evaluate, convert): a training model_dir or a params checkpoint
-> (config, params, vocab, decoder_only), with the one-line refusals every command shares."""

import os

from t5lite.data import tasks
from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.train.checkpoint import decoder_only_of, is_params_checkpoint, load_any_params, load_train_checkpoint_params
from t5lite.train.checks import checkpoint_vocabulary


def refuse_card_run(path: str, flag: str) -> None:
    """A LoRA card run's model_dir (or a card directory) holds the card, not a model: say how to use it."""
    if any(os.path.isfile(os.path.join(path, *parts, "card.json")) for parts in ((), ("card",))):
        raise UserError(f"{flag} {path} is a LoRA card run, not a model; pass its base checkpoint as {flag} and "
                        f"this directory as --card (infer/eval), or fold it in first: t5lite cards merge {path} "
                        "--out DIR")


def load_for_inference(checkpoint: str, vocab_path=None, flag: str = "--checkpoint"):
    """(config, params, vocab, decoder_only) from a training model_dir (its newest readable step) or a
    params checkpoint. A --vocab other than the one a training checkpoint stored is refused (its ids
    would mean other pieces)."""
    if not os.path.exists(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist; pass a model_dir or a converted checkpoint")
    refuse_card_run(checkpoint, flag)
    given = Vocabulary(vocab_path) if vocab_path else None  # a bad --vocab fails before the model is read
    if is_params_checkpoint(checkpoint):
        (config, params), vocab, decoder_only = load_any_params(checkpoint), None, False
    else:
        config, params, meta = load_train_checkpoint_params(checkpoint)
        vocab, decoder_only = checkpoint_vocabulary(meta), decoder_only_of(meta, params)
    if given is not None:
        if vocab is not None and given.serialized_model != vocab.serialized_model:
            raise UserError(f"--vocab {vocab_path} is not the vocabulary {checkpoint} was trained with (its ids would "
                            "mean other pieces); drop --vocab to use the checkpoint's")
        vocab = given
    vocab = vocab or tasks.default_vocabulary()
    if vocab.vocab_size > config.vocab_size:
        raise UserError(f"the vocabulary has {vocab.vocab_size} pieces, more than the model's vocab_size "
                        f"{config.vocab_size}; pass the vocabulary the checkpoint was trained with (--vocab)")
    return config, params, vocab, decoder_only
