"""Input pipeline: dialogue corpora, tokenizers, byte-level text, batches.

Self-contained: imports nothing from the rest of ``reformer_jax``. Needs
numpy and sentencepiece; ``grain`` (prefetch) and ``tensorflow_datasets``
(optional array_record storage) are imported only when used.
"""

from .dialogues import (
    SYSTEM,
    USER,
    Dialogue,
    TurnSpan,
    canonical_split,
    dialogue_stats,
    download_multiwoz,
    format_dialogue,
    format_dialogue_with_spans,
    iter_turn_segments,
    load_dialogues,
    multiwoz_urls,
    read_dialogue_file,
    resolve_data_dir,
)
from .duplication import DuplicationSource
from .pipeline import (
    BatchSource,
    DialogueExamples,
    batch_indices,
    encode_dialogue,
    length_grouped_indices,
    load_dialogue_examples,
    load_tfds_dialogues,
    make_batches,
    prepare_tfds_dialogues,
)
from .text import BYTE_VOCAB_SIZE, ByteTextSource, decode_bytes, load_text_bytes, process_rows, split_by_position
from .translation import TranslationExamples, load_parallel
from .tokenizer import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_or_train_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "PAD_ID",
    "SYSTEM",
    "UNK_ID",
    "USER",
    "BatchSource",
    "ByteTextSource",
    "ByteTokenizer",
    "Dialogue",
    "DialogueExamples",
    "DuplicationSource",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TranslationExamples",
    "TurnSpan",
    "batch_indices",
    "length_grouped_indices",
    "canonical_split",
    "decode_bytes",
    "dialogue_stats",
    "download_multiwoz",
    "encode_dialogue",
    "format_dialogue",
    "format_dialogue_with_spans",
    "iter_turn_segments",
    "load_dialogue_examples",
    "load_dialogues",
    "load_or_train_tokenizer",
    "load_parallel",
    "load_text_bytes",
    "load_tfds_dialogues",
    "make_batches",
    "multiwoz_urls",
    "prepare_tfds_dialogues",
    "process_rows",
    "read_dialogue_file",
    "resolve_data_dir",
    "split_by_position",
    "train_sentencepiece",
]
