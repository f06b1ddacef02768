"""A Hugging Face-style sequence classifier, written as outside code, without ``transformers``.

What it mimics from ``transformers``:

- ``ModelOutput``: an ``OrderedDict`` subclass and dataclass whose fields are reachable as
  attributes (``out.loss``), by key (``out["loss"]``) and by position (``out[0]``, ``to_tuple()``);
  fields left at None are not keys. ``SequenceClassifierOutput(loss, logits, hidden_states,
  attentions)`` is one.
- A small BERT (embeddings + post-LayerNorm encoder layers + tanh pooler on the first token +
  classifier): ``TinyBertForSequenceClassification(config).forward(input_ids,
  attention_mask=None, token_type_ids=None, labels=None, return_dict=None)`` returns a
  ``SequenceClassifierOutput``, with the cross-entropy loss when ``labels`` are given (MSE for
  ``num_labels == 1``), and a tuple when ``return_dict=False``.
- ``DataCollatorWithPadding``: pads ``input_ids`` to the longest in the batch (optionally a
  multiple of ``pad_to_multiple_of``), adds ``attention_mask``, renames ``label`` to ``labels``.

The data: a "sentiment" task on token ids. Each example starts with ``[CLS]`` and has a random
length; some tokens are "positive" words, some "negative", the rest neutral; the label is 1 when
positive words outnumber negative ones (no ties). Items are dicts ``{"input_ids":
LongTensor[L_i], "label": int}`` as a tokenized ``datasets.Dataset`` in torch format gives them.

Only ``make_task`` knows about batchlab, and imports it lazily.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------
# Outputs (transformers.utils.generic.ModelOutput, transformers.modeling_outputs)
# ---------------------------------------------------------------------------------------------


class ModelOutput(OrderedDict):
    """Base class for model outputs: a dataclass that is also an ordered dict of its non-None
    fields. Index by name or by position; ``to_tuple()`` gives the non-None fields in order."""

    def __post_init__(self):
        for field in fields(self):
            v = getattr(self, field.name)
            if v is not None:
                self[field.name] = v

    def __delitem__(self, *args, **kwargs):
        raise Exception(f"You cannot use ``__delitem__`` on a {self.__class__.__name__} instance.")

    def setdefault(self, *args, **kwargs):
        raise Exception(f"You cannot use ``setdefault`` on a {self.__class__.__name__} instance.")

    def pop(self, *args, **kwargs):
        raise Exception(f"You cannot use ``pop`` on a {self.__class__.__name__} instance.")

    def update(self, *args, **kwargs):
        raise Exception(f"You cannot use ``update`` on a {self.__class__.__name__} instance.")

    def __getitem__(self, k):
        if isinstance(k, str):
            inner_dict = dict(self.items())
            return inner_dict[k]
        else:
            return self.to_tuple()[k]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            # Don't call self.__setitem__ to avoid recursion errors
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        # Will raise a KeyException if needed
        super().__setitem__(key, value)
        # Don't call self.__setattr__ to avoid recursion errors
        super().__setattr__(key, value)

    def __reduce__(self):
        args = tuple(getattr(self, field.name) for field in fields(self))
        return type(self), args

    def to_tuple(self):
        """Convert self to a tuple containing all the attributes/keys that are not ``None``."""
        return tuple(self[k] for k in self.keys())


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


# ---------------------------------------------------------------------------------------------
# Model (a small BERT, after transformers.models.bert.modeling_bert)
# ---------------------------------------------------------------------------------------------


@dataclass
class TinyBertConfig:
    vocab_size: int = 64
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 128
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    use_return_dict: bool = True


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(self, input_ids, token_type_ids=None):
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = self.LayerNorm(embeddings)
        embeddings = self.dropout(embeddings)
        return embeddings


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                f"heads ({config.num_attention_heads})"
            )
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            # the extended mask: 0 where attending is allowed, a large negative number at padding
            attention_scores = attention_scores + attention_mask
        attention_probs = F.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        return context_layer.view(new_context_layer_shape), attention_probs


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_output = BertSelfOutput(config)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, attention_mask=None):
        context, attention_probs = self.attention(hidden_states, attention_mask)
        attention_output = self.attention_output(context, hidden_states)
        intermediate_output = F.gelu(self.intermediate(attention_output))
        layer_output = self.output_dropout(self.output(intermediate_output))
        layer_output = self.output_LayerNorm(layer_output + attention_output)
        return layer_output, attention_probs


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        # "pool" by taking the hidden state of the first token ([CLS])
        first_token_tensor = hidden_states[:, 0]
        return self.activation(self.dense(first_token_tensor))


class TinyBertForSequenceClassification(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = BertPooler(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def get_extended_attention_mask(self, attention_mask, dtype):
        extended = attention_mask[:, None, None, :].to(dtype=dtype)
        return (1.0 - extended) * torch.finfo(dtype).min

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
    ):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden_states = self.embeddings(input_ids, token_type_ids)
        extended_attention_mask = self.get_extended_attention_mask(attention_mask, hidden_states.dtype)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, attention_probs = layer(hidden_states, extended_attention_mask)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if output_attentions:
                all_attentions = all_attentions + (attention_probs,)
        pooled_output = self.dropout(self.pooler(hidden_states))
        logits = self.classifier(pooled_output)

        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            else:
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))

        if not return_dict:
            output = (logits,) + tuple(v for v in (all_hidden_states, all_attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output

        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=all_hidden_states, attentions=all_attentions
        )


# ---------------------------------------------------------------------------------------------
# Data: variable-length token sequences with a counting "sentiment" label
# ---------------------------------------------------------------------------------------------

PAD_ID, CLS_ID = 0, 1
_FIRST_WORD = 2


class SentimentTokens(Dataset):
    """``n`` examples ``{"input_ids": LongTensor[L_i], "label": int}``, deterministic in ``seed``.

    Token ids: 0 = [PAD], 1 = [CLS], then ``n_positive`` "positive" words, ``n_negative``
    "negative" words and neutral words up to ``vocab_size``. Each example is [CLS] followed by
    ``min_len..max_len`` words; about ``sentiment_fraction`` of them carry sentiment and the
    label is 1 when positive words outnumber negative ones (counts never tie).
    """

    def __init__(self, n=1024, seed=0, vocab_size=64, min_len=8, max_len=48, n_positive=4, n_negative=4,
                 sentiment_fraction=0.3):
        g = torch.Generator().manual_seed(seed)
        pos = torch.arange(_FIRST_WORD, _FIRST_WORD + n_positive)
        neg = torch.arange(_FIRST_WORD + n_positive, _FIRST_WORD + n_positive + n_negative)
        first_neutral = _FIRST_WORD + n_positive + n_negative
        if first_neutral >= vocab_size:
            raise ValueError(f"vocab_size {vocab_size} leaves no neutral words")
        self.vocab_size = vocab_size
        self.examples = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            words = torch.randint(first_neutral, vocab_size, (length,), generator=g)
            n_sent = max(1, int(round(sentiment_fraction * length)))
            if n_sent % 2 == 0:  # odd: positive and negative counts cannot tie
                n_sent = n_sent + 1 if n_sent < length else n_sent - 1
            slots = torch.randperm(length, generator=g)[:n_sent]
            is_pos = torch.rand(n_sent, generator=g) < 0.5
            words[slots[is_pos]] = pos[torch.randint(0, n_positive, (int(is_pos.sum()),), generator=g)]
            words[slots[~is_pos]] = neg[torch.randint(0, n_negative, (int((~is_pos).sum()),), generator=g)]
            label = int(int(is_pos.sum()) > n_sent - int(is_pos.sum()))
            self.examples.append({"input_ids": torch.cat([torch.tensor([CLS_ID]), words]), "label": label})

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, idx):
        ex = self.examples[idx]
        return {"input_ids": ex["input_ids"], "label": ex["label"]}


class DataCollatorWithPadding:
    """Pad ``input_ids`` to the longest sequence of the batch (rounded up to a multiple of
    ``pad_to_multiple_of`` if set); return ``input_ids``, ``attention_mask`` and ``labels``
    (renamed from ``label``/``label_ids``, as transformers does), other keys stacked."""

    def __init__(self, pad_token_id=PAD_ID, pad_to_multiple_of=None, padding_side="right"):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, features):
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(len(t) for t in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, t in enumerate(ids):
            if self.padding_side == "right":
                input_ids[i, : len(t)] = t
                attention_mask[i, : len(t)] = 1
            else:
                input_ids[i, length - len(t):] = t
                attention_mask[i, length - len(t):] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in features[0]:
            if key in ("input_ids", "attention_mask"):
                continue
            out_key = "labels" if key in ("label", "label_ids") else key
            batch[out_key] = torch.as_tensor([f[key] for f in features])
        return batch


# ---------------------------------------------------------------------------------------------
# batchlab entry point
# ---------------------------------------------------------------------------------------------


def make_model(config=None):
    return TinyBertForSequenceClassification(config if config is not None else TinyBertConfig())


def make_task(n_train=1024, n_val=256, seed=0, max_len=48, **kw: Any):
    """A batchlab Task: a 2-layer BERT-style classifier on variable-length token sequences.

    Batches are dicts (``input_ids``, ``attention_mask``, ``labels``) padded per batch by
    ``DataCollatorWithPadding``; batchlab calls ``model(**batch)`` and reads ``out.loss`` and
    ``out.logits``. Further keyword arguments go to ``Task.from_torch`` and override the
    defaults below.
    """
    from batchlab import Task

    config = TinyBertConfig(max_position_embeddings=max(128, max_len + 1))
    train = SentimentTokens(n_train, seed=2 * seed, vocab_size=config.vocab_size, max_len=max_len)
    val = SentimentTokens(n_val, seed=2 * seed + 1, vocab_size=config.vocab_size, max_len=max_len)
    args: dict[str, Any] = dict(
        name="hf-style-cls",
        model=functools.partial(make_model, config),
        train=train,
        val=val,
        collate_fn=DataCollatorWithPadding(pad_token_id=config.pad_token_id),
        metric="accuracy",
        optimizer="adamw",
        lr=2e-3,
        batch_size=32,
        epochs=2,
    )
    args.update(kw)
    return Task.from_torch(**args)
