"""A nanoGPT-style character language model on a text file, written as outside code.

The model follows karpathy/nanoGPT's ``model.py`` (GPTConfig, LayerNorm with optional bias,
CausalSelfAttention, MLP, Block, GPT with weight tying, the scaled init of the residual
projections, ``forward(idx, targets=None) -> (logits, loss)``, ``generate``); the data follows its
``shakespeare_char`` recipe (vocabulary = the sorted set of characters, 90/10 train/val split)
with minGPT's map-style ``CharDataset`` (item ``i`` = the ``block_size`` characters from ``i`` and
the same window shifted by one).

The corpus is generated from a small grammar (``write_corpus``) so that tests need no download
and there is structure to learn. Only ``make_task`` knows about batchlab, and imports it lazily.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------
# Model (karpathy/nanoGPT, model.py)
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # flash attention make GPU go brrrrr but support is only in PyTorch >= 2.0
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        if not self.flash:
            # causal mask to ensure that attention is only applied to the left in the input sequence
            self.register_buffer(
                "bias",
                torch.tril(torch.ones(config.block_size, config.block_size)).view(1, 1, config.block_size, config.block_size),
            )

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
        if self.flash:
            # efficient attention using Flash Attention CUDA kernels
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            # manual implementation of attention
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # with weight tying when using torch.compile() some warnings get generated:
        # "UserWarning: functional_call was passed multiple values for tied weights.
        # This behavior is deprecated and will be an error in future versions"
        # not 100% sure what this is, so far seems to be harmless. TODO investigate
        self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # start with all of the candidate parameters
        param_dict = {pn: p for pn, p in self.named_parameters()}
        # filter out those that do not require grad
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        return optimizer

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        Most likely you'll want to make sure to be in model.eval() mode of operation for this.
        """
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            # forward the model to get the logits for the index in the sequence
            logits, _ = self(idx_cond)
            # pluck the logits at the final step and scale by desired temperature
            logits = logits[:, -1, :] / temperature
            # optionally crop the logits to only the top k options
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            # apply softmax to convert logits to (normalized) probabilities
            probs = F.softmax(logits, dim=-1)
            # sample from the distribution
            idx_next = torch.multinomial(probs, num_samples=1)
            # append sampled index to the running sequence and continue
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# ---------------------------------------------------------------------------------------------
# A text corpus with structure: sentences from a small grammar
# ---------------------------------------------------------------------------------------------

_DET = ["the", "a", "every", "one", "that"]
_ADJ = ["small", "red", "quiet", "old", "bright", "lazy", "green", "brave"]
_NOUN = ["cat", "dog", "bird", "king", "river", "house", "ship", "child", "tree", "stone"]
_VERB = ["sees", "likes", "finds", "follows", "keeps", "carries", "watches", "hears"]
_IVERB = ["sleeps", "sings", "waits", "runs", "falls", "laughs"]
_PREP = ["near", "under", "behind", "over", "beside"]
_ADV = ["slowly", "today", "again", "at night", "in the rain"]


def _noun_phrase(r):
    words = [r.choice(_DET)]
    if r.random() < 0.5:
        words.append(r.choice(_ADJ))
    words.append(r.choice(_NOUN))
    if r.random() < 0.2:
        words += [r.choice(_PREP), r.choice(_DET), r.choice(_NOUN)]
    return words


def _sentence(r):
    words = _noun_phrase(r)
    if r.random() < 0.6:
        words += [r.choice(_VERB)] + _noun_phrase(r)
    else:
        words.append(r.choice(_IVERB))
    if r.random() < 0.3:
        words.append(r.choice(_ADV))
    text = " ".join(words)
    end = "?" if words[0] == "every" and r.random() < 0.3 else "."
    return text[0].upper() + text[1:] + end


def make_corpus(n_chars=50_000, seed=0):
    """Deterministic English-like text of exactly ``n_chars`` characters: sentences from a small
    grammar, a few per line, blank lines between paragraphs."""
    r = random.Random(seed)
    parts, total = [], 0
    while total < n_chars:
        line = " ".join(_sentence(r) for _ in range(r.randint(1, 4)))
        line += "\n\n" if r.random() < 0.2 else "\n"
        parts.append(line)
        total += len(line)
    return "".join(parts)[:n_chars]


def write_corpus(path, n_chars=50_000, seed=0):
    """Write ``make_corpus(n_chars, seed)`` to ``path`` (atomically: a temporary file, then a
    rename, so concurrent writers never leave a half-written file). Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".corpus-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(make_corpus(n_chars, seed))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def default_corpus_path(n_chars=50_000, seed=0):
    """The generated corpus in a per-user temporary folder, written on first use."""
    folder = os.path.join(tempfile.gettempdir(), f"byo-char-gpt-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    path = os.path.join(folder, f"corpus-n{n_chars}-s{seed}.txt")
    if not os.path.exists(path):
        write_corpus(path, n_chars, seed)
    return path


# ---------------------------------------------------------------------------------------------
# Data (nanoGPT data/shakespeare_char/prepare.py + minGPT's CharDataset)
# ---------------------------------------------------------------------------------------------


class CharVocab:
    """Characters <-> integers; the vocabulary is the sorted set of characters of the text."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.itos = {i: ch for i, ch in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, s):
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)


class CharDataset(Dataset):
    """Blocks of ``block_size`` character ids and the same block shifted by one.

    ``split`` picks the first ``1 - val_fraction`` of the file ("train") or the rest ("val"); the
    vocabulary always comes from the whole file, so both splits share it. ``stride`` is the step
    between window starts (1: every position, as in minGPT).
    """

    def __init__(self, path, block_size=32, split="train", val_fraction=0.1, stride=1):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.path = os.fspath(path)
        self.vocab = CharVocab(text)
        n = int(len(text) * (1 - val_fraction))
        part = text[:n] if split == "train" else text[n:]
        self.data = torch.tensor(self.vocab.encode(part), dtype=torch.long)
        self.block_size = block_size
        self.split = split
        self.stride = stride

    @property
    def vocab_size(self):
        return len(self.vocab)

    def __len__(self):
        return max(0, (len(self.data) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, idx):
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        i = idx * self.stride
        chunk = self.data[i : i + self.block_size + 1]
        x = chunk[:-1]
        y = chunk[1:]
        return x, y


# ---------------------------------------------------------------------------------------------
# batchlab entry point
# ---------------------------------------------------------------------------------------------


def make_model(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True):
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, dropout=dropout, bias=bias))


def gpt_forward(model, batch):
    """``model(x, y)``: nanoGPT computes the loss itself when given targets."""
    return model(batch[0], batch[1])


def gpt_loss(out, batch):
    """The loss nanoGPT returned: ``(logits, loss)[1]``."""
    return out[1]


def make_task(path=None, block_size=32, n_layer=2, n_head=2, n_embd=64, seed=0, n_chars=50_000, stride=8, **kw: Any):
    """A batchlab Task: a small GPT on a character-level text file; metric = validation loss.

    ``path``: the text file; None writes the generated corpus (``n_chars`` characters from
    ``seed``) into a temporary folder. ``stride``: step between training windows (1 = every
    position; the default 8 keeps an epoch short). Further keyword arguments go to
    ``Task.from_torch`` and override the defaults below.
    """
    from batchlab import Task

    if path is None:
        path = default_corpus_path(n_chars, seed)
    train = CharDataset(path, block_size, "train", stride=stride)
    val = CharDataset(path, block_size, "val", stride=stride)
    model = functools.partial(make_model, block_size=block_size, vocab_size=train.vocab_size,
                              n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    args: dict[str, Any] = dict(
        name="char-gpt",
        model=model,
        train=train,
        val=val,
        forward=gpt_forward,
        loss=gpt_loss,
        metric="loss",
        optimizer="adamw",
        lr=1e-3,
        batch_size=32,
        epochs=1,
    )
    args.update(kw)
    return Task.from_torch(**args)
