"""Synthetic teacher corpus with realistic top-K statistics (benchmark data source).

The generator mimics what a causal LM teacher produces over a tokenized corpus: for every
position ``t`` of a sequence, the input token id ``x[t]`` and the teacher's top-K token ids
(ordered by teacher rank) with their log-probabilities under the FULL-vocabulary softmax, so
``1 - sum(exp(logprobs))`` is the true tail mass.  Everything is vectorized numpy and
deterministic for a given seed and :class:`SyntheticParams`.

Model (all parameters are fields of :class:`SyntheticParams`)
-----------------------------------------------------------
Vocabulary.  Token frequencies follow a Zipf-Mandelbrot law over *frequency ranks* ``r``:
``p(r) ~ (r + zipf_q) ** -zipf_s``.  Ids are assigned to frequency ranks the way byte-level
BPE vocabularies end up: ids ``0..255`` are the byte alphabet (``n_frequent_bytes`` of them
frequent, e.g. punctuation and letters, the others rare), the remaining ids are merges in
merge order, modelled as sorting frequency ranks by the noisy key
``log(r + 1) + id_noise * N(0, 1)``.  Lower ids are therefore more frequent, imperfectly
(``id_noise`` was chosen so that the Spearman correlation between id and frequency rank is
close to that of a BPE tokenizer trained on real text, see ``benches/ngram_teacher.py``).

Input tokens.  Sequence lengths are log-normal (median ``seq_len_median``, log-sd
``seq_len_sigma``, clipped to ``[seq_len_min, seq_len_max]``).  Each sequence is one
document with its own vocabulary of ``doc_tokens_min..doc_tokens_max`` ids drawn from the
global law restricted to frequency ranks ``>= doc_min_rank`` (identifiers, names, content
words); within the document they follow a 1/(i+1) law.  Each input token is, independently,
a document token (``p_doc``), a copy of a token ``1 + Geometric(1/copy_mean_offset)``
positions back (``p_copy``; identifiers recur), or a draw from the global law.

Teacher rows.  The row at position ``t`` predicts ``x[t+1]``.  Its full logit vector is
``z[v] = tau * log p(v) + beta`` for background tokens (the unigram prior, flattened by the
per-row ``tau`` drawn from ``tau_grid``; the ``n_background_top`` globally most frequent
tokens get extra ``N(0, background_noise)`` jitter so their order varies by context), and
``M = k + k // 2`` candidate tokens get ``logaddexp`` of their background logit and a
candidate logit.  Candidate logits are ``-sigma * log(Gamma_j)`` with ``Gamma_j`` the
cumulative sums of Exp(1) draws, i.e. the top order statistics of Gumbel noise: the
probability decays as a power of the rank (``p_j ~ j ** -sigma``) as observed in LMs;
``sigma ~ U(sigma_min, sigma_max)``.  The top candidate is then lifted so the row's top-1
probability is a target ``p1``: with probability ``p_confident`` near-certain
(``1 - p1 ~ LogUniform(confident_lo, confident_hi)``), otherwise ``Beta(p1_a, p1_b)``.  The
background carries a fraction ``f ~ Beta(tail_a, tail_b)`` of the non-top-1 mass.
Candidate ids are drawn per slot from a rank-dependent mixture (``mix_top`` at the top slot
to ``mix_bottom`` at the last) of recent input tokens (last ``recent_window`` positions),
document tokens, global draws (generic frequent tokens: the law sharpened to exponent
``glob_s``) and "context noise" (flattened to exponent ``noise_s``), deduplicated.  The true next
token is put into the slot sampled from the row's own distribution (a calibrated teacher:
its top-1 accuracy is about ``E[p1]``, about 50%) or, with the probability of the
background, left out of the candidates.

Calibration (measured by ``benches/codec_experiments.py``, K = 64, V = 32768): top-1
probability median 0.46 (q10 0.18, q90 1.00), tail mass mean 0.075, top-1 accuracy 0.53,
next token in top-K 0.93, 25% of a row's ids also in the previous row, about 19.5k distinct
ids per 4096 rows.  The id statistics are on the diffuse side of what an LM teacher would
show (the real-text n-gram teacher has 7.5k distinct ids per 4096 rows); the parameters
above are the knobs for other assumptions.

Modes.  :func:`generate` returns top-K rows (analytic full-softmax normaliser: the
background sum ``sum_v exp(tau * log p(v))`` is precomputed per ``tau`` on the grid, so the
tail mass is exact).  :func:`generate_logits` materializes the same model as dense
``[L, V]`` float32 logits for a few sequences; ``log_softmax`` of them has the same top-K ids
and, up to float32 rounding of the logits, the same log-probabilities as :func:`generate`
with the same seed, parameters and lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SyntheticParams",
    "TeacherCorpus",
    "Vocabulary",
    "generate",
    "generate_logits",
    "make_vocabulary",
]


@dataclass(frozen=True)
class SyntheticParams:
    """Parameters of the synthetic teacher model (see the module docstring)."""

    vocab_size: int = 32768
    k: int = 64
    # vocabulary
    zipf_s: float = 1.05
    zipf_q: float = 5.0
    id_noise: float = 0.8
    n_frequent_bytes: int = 64
    # sequences and documents
    seq_len_median: float = 900.0
    seq_len_sigma: float = 0.8
    seq_len_min: int = 16
    seq_len_max: int = 4096
    doc_tokens_min: int = 64
    doc_tokens_max: int = 384
    doc_min_rank: int = 300
    p_doc: float = 0.25
    p_copy: float = 0.10
    copy_mean_offset: float = 24.0
    # teacher rows
    p_confident: float = 0.22
    confident_lo: float = 1e-4
    confident_hi: float = 0.1
    p1_a: float = 1.2
    p1_b: float = 2.0
    sigma_min: float = 0.9
    sigma_max: float = 2.2
    tail_a: float = 1.2
    tail_b: float = 8.0
    tau_grid: tuple[float, ...] = field(default_factory=lambda: tuple(np.linspace(0.3, 0.9, 25)))
    background_noise: float = 1.0
    recent_window: int = 32
    # per-slot source mixture (recent, doc, global, noise) at the top slot and the last slot,
    # interpolated linearly in log(slot + 1)
    mix_top: tuple[float, float, float, float] = (0.25, 0.30, 0.35, 0.10)
    mix_bottom: tuple[float, float, float, float] = (0.10, 0.25, 0.45, 0.20)
    glob_s: float = 1.2
    noise_s: float = 0.95

    @property
    def n_candidates(self) -> int:
        """Number of candidate slots per row (``M``)."""
        return self.k + max(self.k // 2, 8)

    @property
    def n_background_top(self) -> int:
        """Globally most frequent tokens considered for the top-K besides the candidates."""
        return self.k + self.n_candidates


@dataclass(frozen=True)
class Vocabulary:
    """Token frequency law and the frequency-rank <-> id mapping."""

    log_prob_by_rank: np.ndarray  # float64 [V], log p(r), descending
    id_of_rank: np.ndarray  # int64 [V]
    rank_of_id: np.ndarray  # int64 [V]

    @property
    def log_prob_by_id(self) -> np.ndarray:
        """``log p`` indexed by token id."""
        return self.log_prob_by_rank[self.rank_of_id]


@dataclass
class TeacherCorpus:
    """A flat teacher corpus: sequences concatenated, with offsets.

    ``topk_ids[t]`` / ``topk_logprobs[t]`` is the teacher row at position ``t`` (predicting
    ``input_ids[t + 1]`` within the same sequence).
    """

    offsets: np.ndarray  # int64 [n_sequences + 1]
    input_ids: np.ndarray  # int32 [N]
    topk_ids: np.ndarray  # int32 [N, K]
    topk_logprobs: np.ndarray  # float32 [N, K]
    vocab_size: int
    source: str = "synthetic"
    next_ids: np.ndarray | None = None  # int32 [N]: the token each row predicts

    @property
    def n_positions(self) -> int:
        """Total number of positions."""
        return int(self.input_ids.shape[0])

    @property
    def k(self) -> int:
        """Number of ids per row."""
        return int(self.topk_ids.shape[1])

    def sequences(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(input_ids, topk_ids, topk_logprobs)`` views per sequence."""
        for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            yield self.input_ids[a:b], self.topk_ids[a:b], self.topk_logprobs[a:b]


def make_vocabulary(params: SyntheticParams, rng: np.random.Generator) -> Vocabulary:
    """Zipf-Mandelbrot frequencies and a BPE-like (imperfectly frequency-ordered) id map."""
    v = params.vocab_size
    ranks = np.arange(v, dtype=np.float64)
    logw = -params.zipf_s * np.log(ranks + params.zipf_q)
    log_prob = logw - np.logaddexp.reduce(logw)
    # byte tokens: a few frequent ones (log-uniform over the first ranks), the rest rare
    nb = min(256, v // 4)
    n_freq_bytes = min(params.n_frequent_bytes, nb)
    freq_pool = np.unique(np.exp(rng.uniform(0.0, np.log(min(2000, v // 2)), 4 * n_freq_bytes)))
    freq_pool = rng.permutation(freq_pool.astype(np.int64))
    freq_pool = np.unique(freq_pool)[: n_freq_bytes * 2]
    freq_bytes = rng.permutation(freq_pool)[:n_freq_bytes]
    rare_lo = v // 4
    rare_bytes = rng.choice(np.arange(rare_lo, v), size=nb - freq_bytes.size, replace=False)
    byte_ranks = np.concatenate([freq_bytes, rare_bytes])
    byte_ranks = rng.permutation(byte_ranks)
    is_byte = np.zeros(v, dtype=bool)
    is_byte[byte_ranks] = True
    merge_ranks = np.flatnonzero(~is_byte)
    key = np.log(merge_ranks + 1.0) + params.id_noise * rng.standard_normal(merge_ranks.size)
    merge_ranks = merge_ranks[np.argsort(key, kind="stable")]
    id_of_rank = np.empty(v, dtype=np.int64)
    id_of_rank[byte_ranks] = np.arange(nb)
    id_of_rank[merge_ranks] = np.arange(nb, v)
    rank_of_id = np.empty(v, dtype=np.int64)
    rank_of_id[id_of_rank] = np.arange(v)
    return Vocabulary(log_prob, id_of_rank, rank_of_id)


_GUIDE_BITS = 20


class _Sampler:
    """Inverse-CDF sampling of frequency ranks with a guide table (exact, fast)."""

    def __init__(self, log_prob_by_rank: np.ndarray):
        cdf = np.cumsum(np.exp(log_prob_by_rank - log_prob_by_rank.max()))
        self.cdf = cdf / cdf[-1]
        grid = np.arange((1 << _GUIDE_BITS) + 1, dtype=np.float64) / (1 << _GUIDE_BITS)
        self.guide = np.minimum(np.searchsorted(self.cdf, grid, side="right"), cdf.size - 1)

    def __call__(self, rng: np.random.Generator, size: int | tuple) -> np.ndarray:
        u = rng.random(size)
        j = (u * (1 << _GUIDE_BITS)).astype(np.int64)
        lo = self.guide[j]
        amb = self.guide[j + 1] != lo
        if amb.any():
            lo[amb] = np.minimum(np.searchsorted(self.cdf, u[amb], side="right"), self.cdf.size - 1)
        return lo


def _sample_lengths(params: SyntheticParams, rng: np.random.Generator, n_positions: int):
    lengths: list[np.ndarray] = []
    total = 0
    while total < n_positions:
        ln = np.exp(np.log(params.seq_len_median) + params.seq_len_sigma * rng.standard_normal(64))
        ln = np.clip(np.rint(ln), params.seq_len_min, params.seq_len_max).astype(np.int64)
        lengths.append(ln)
        total += int(ln.sum())
    ln = np.concatenate(lengths)
    cum = np.cumsum(ln)
    n = int(np.searchsorted(cum, n_positions)) + 1
    ln = ln[:n].copy()
    ln[-1] -= int(cum[n - 1]) - n_positions
    if ln[-1] <= 0:
        ln = ln[:-1]
    return ln


def _lse(x: np.ndarray) -> np.ndarray:
    mx = x.max(axis=1)
    return mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))


class _Model:
    """Precomputed per-vocabulary arrays shared by both modes."""

    def __init__(self, params: SyntheticParams, rng: np.random.Generator):
        self.p = params
        self.vocab = make_vocabulary(params, rng)
        lp = self.vocab.log_prob_by_rank
        self.glob = _Sampler(params.glob_s / params.zipf_s * lp)
        self.unigram = _Sampler(lp)
        self.noise = _Sampler(params.noise_s / params.zipf_s * lp)
        self.g_id = self.vocab.log_prob_by_id
        self.tau = np.asarray(params.tau_grid, dtype=np.float64)
        # sum_v exp(tau * log p(v)), exact per grid value (float64)
        self.log_bg_sum = np.array([np.logaddexp.reduce(t * lp) for t in self.tau])
        self.top_ids = self.vocab.id_of_rank[: params.n_background_top]
        self.doc = _Sampler(lp[params.doc_min_rank :])


def _inputs(model: _Model, lengths: np.ndarray, rng: np.random.Generator):
    """Input ids for all sequences (plus one hidden next token per sequence)."""
    p = model.p
    n_seq = lengths.size
    ext = lengths + 1  # one extra token: what the last row predicts
    starts = np.concatenate([[0], np.cumsum(ext)[:-1]])
    n = int(ext.sum())
    seq_of = np.repeat(np.arange(n_seq), ext)
    pos = np.arange(n) - starts[seq_of]
    n_doc = rng.integers(p.doc_tokens_min, p.doc_tokens_max + 1, size=n_seq)
    doc_start = np.concatenate([[0], np.cumsum(n_doc)[:-1]])
    doc_ids = model.vocab.id_of_rank[p.doc_min_rank + model.doc(rng, int(n_doc.sum()))]
    u = rng.random(n)
    glob = model.vocab.id_of_rank[model.unigram(rng, n)]
    di = np.floor(np.exp(rng.random(n) * np.log(n_doc[seq_of] + 1.0))).astype(np.int64) - 1
    di = np.clip(di, 0, n_doc[seq_of] - 1)
    from_doc = doc_ids[doc_start[seq_of] + di]
    off = 1 + rng.geometric(1.0 / p.copy_mean_offset, size=n) - 1
    ids = np.where(u < p.p_doc, from_doc, glob)
    src = np.arange(n)
    is_copy = (u >= p.p_doc) & (u < p.p_doc + p.p_copy) & (pos - off >= 0)
    src[is_copy] -= off[is_copy]
    for _ in range(64):  # pointer jumping resolves chains of copies
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    ids = ids[src]
    return ids.astype(np.int64), starts, seq_of, pos, doc_ids, doc_start, n_doc


def _rows(
    model: _Model,
    ids_ext: np.ndarray,
    row_index: np.ndarray,
    seq_of: np.ndarray,
    pos: np.ndarray,
    doc_ids: np.ndarray,
    doc_start: np.ndarray,
    n_doc: np.ndarray,
    rng: np.random.Generator,
):
    """Candidate ids/logits and background parameters for a block of rows.

    ``row_index`` are indices into ``ids_ext`` of the positions whose rows are built; the
    truth is ``ids_ext[row_index + 1]``.
    """
    p = model.p
    n = row_index.size
    m = p.n_candidates
    m_raw = m + m // 2
    truth = ids_ext[row_index + 1]
    # row shape
    conf = rng.random(n) < p.p_confident
    p1 = np.where(
        conf,
        1.0 - np.exp(rng.uniform(np.log(p.confident_lo), np.log(p.confident_hi), n)),
        rng.beta(p.p1_a, p.p1_b, n),
    )
    p1 = np.clip(p1, 0.02, 1.0 - 1e-6)
    sigma = rng.uniform(p.sigma_min, p.sigma_max, n)
    tail_f = np.clip(rng.beta(p.tail_a, p.tail_b, n), 1e-4, 0.95)
    tau_i = rng.integers(0, model.tau.size, n)
    tau = model.tau[tau_i]
    gam = np.cumsum(rng.exponential(1.0, (n, m)), axis=1)
    y = -sigma[:, None] * np.log(gam)
    rest = _lse(y[:, 1:])  # log A
    log_b = rest + np.log(tail_f / (1.0 - tail_f))  # background mass
    beta = log_b - model.log_bg_sum[tau_i]
    log_ab = np.logaddexp(rest, log_b)
    y0 = np.log(p1 / (1.0 - p1)) + log_ab
    y[:, 0] = np.maximum(y0, y[:, 1])
    # the slot holding the truth, sampled from the row's own distribution (approximately)
    log_tot = np.logaddexp(_lse(y), log_b)
    cum = np.cumsum(np.exp(y - log_tot[:, None]), axis=1)
    ut = rng.random(n)
    truth_slot = (cum < ut[:, None]).sum(axis=1)  # == m: background, not a candidate
    # candidate ids from the rank-dependent source mixture
    slot = np.arange(m_raw)
    w = np.minimum(np.log1p(slot) / np.log(m), 1.0)[:, None]
    mix = (1 - w) * np.asarray(p.mix_top) + w * np.asarray(p.mix_bottom)
    mix_cum = np.cumsum(mix / mix.sum(axis=1, keepdims=True), axis=1)
    us = rng.random((n, m_raw))
    src = (us[:, :, None] >= mix_cum[None, :, :]).sum(axis=2)  # 0 recent 1 doc 2 glob 3 noise
    row_of = np.broadcast_to(np.arange(n)[:, None], (n, m_raw))
    # a recent token needs enough history in the sequence; otherwise a global draw
    back = rng.integers(0, p.recent_window, (n, m_raw))
    src = np.where((src == 0) & (back > pos[row_index][:, None]), 2, src)
    cand = np.empty((n, m_raw), dtype=np.int64)
    sel = src == 0
    cand[sel] = ids_ext[row_index[row_of[sel]] - back[sel]]
    sel = src == 1
    s = seq_of[row_index[row_of[sel]]]
    di = np.floor(np.exp(rng.random(s.size) * np.log(n_doc[s] + 1.0))).astype(np.int64)
    cand[sel] = doc_ids[doc_start[s] + np.clip(di - 1, 0, n_doc[s] - 1)]
    sel = src == 2
    cand[sel] = model.vocab.id_of_rank[model.glob(rng, int(sel.sum()))]
    sel = src == 3
    cand[sel] = model.vocab.id_of_rank[model.noise(rng, int(sel.sum()))]
    # deduplicate (keep first occurrence), drop the truth, keep m - 1 (or m) in order
    col_raw = np.arange(m_raw, dtype=np.int64)
    while True:
        srt = np.sort(cand * 256 + col_raw[None, :], axis=1)
        sid, scol = srt >> 8, srt & 255
        dup = np.zeros((n, m_raw), dtype=bool)
        rr, cc = np.nonzero(sid[:, 1:] == sid[:, :-1])
        dup[rr, scol[rr, cc + 1]] = True
        dup |= cand == truth[:, None]
        if ((~dup).sum(axis=1) >= m).all():
            break
        short = (~dup).sum(axis=1) < m
        fresh = model.vocab.id_of_rank[model.noise(rng, (n, m_raw))]
        cand = np.where(short[:, None] & dup, fresh, cand)
    rank_u = np.cumsum(~dup, axis=1) - 1
    rr, cc = np.nonzero(~dup & (rank_u < m))
    uniq = np.empty((n, m), dtype=np.int64)
    uniq[rr, rank_u[rr, cc]] = cand[rr, cc]
    col = np.arange(m)[None, :]
    ts = truth_slot[:, None]
    src_col = np.where(col > ts, col - 1, col)
    cids = np.take_along_axis(uniq, src_col, axis=1)
    cids = np.where(col == ts, truth[:, None], cids)
    # final logits of candidates and of the jittered top background tokens
    bg_c = tau[:, None] * model.g_id[cids] + beta[:, None]
    zc = np.logaddexp(y, bg_c)
    top = model.top_ids
    jitter = p.background_noise * rng.standard_normal((n, top.size))
    zt = tau[:, None] * model.g_id[top][None, :] + beta[:, None] + jitter
    # a top token that is also a candidate takes the candidate's logit (masked here)
    in_c = np.zeros((n, top.size), dtype=bool)
    r_c = model.vocab.rank_of_id[cids]
    rr, cc = np.nonzero(r_c < top.size)
    in_c[rr, r_c[rr, cc]] = True
    return cids, zc, top, zt, in_c, tau, beta


def _log_normalizer(model, tau_i_tau, beta, cids, zc, top, zt, in_c):
    """log sum_v exp(z_v) over the full vocabulary, exactly, in float64."""
    tau = tau_i_tau
    ti = np.searchsorted(model.tau, tau)
    # background sum without the tokens whose logit differs from tau * g + beta
    bg_all = np.exp(model.log_bg_sum[ti])  # sum over V of exp(tau g)
    sub_c = np.exp(tau[:, None] * model.g_id[cids]).sum(axis=1)
    sub_t = np.where(in_c, 0.0, np.exp(tau[:, None] * model.g_id[top][None, :])).sum(axis=1)
    bg_rest = np.maximum(bg_all - sub_c - sub_t, 0.0)
    mx = np.maximum(zc.max(axis=1), zt.max(axis=1))
    s = (
        np.exp(zc - mx[:, None]).sum(axis=1)
        + np.where(in_c, 0.0, np.exp(zt - mx[:, None])).sum(axis=1)
        + bg_rest * np.exp(beta - mx)
    )
    return mx + np.log(s)


def _prepare(params, seed, lengths, n_positions):
    rng = np.random.default_rng(seed)
    model = _Model(params, rng)
    if lengths is None:
        lengths = _sample_lengths(params, rng, n_positions)
    lengths = np.asarray(lengths, dtype=np.int64)
    ids_ext, starts, seq_of, pos, doc_ids, doc_start, n_doc = _inputs(model, lengths, rng)
    # the rows: every extended position except each sequence's hidden last token
    real = np.ones(ids_ext.size, dtype=bool)
    real[starts + lengths] = False
    rows = np.flatnonzero(real)
    return rng, model, lengths, ids_ext, seq_of, pos, doc_ids, doc_start, n_doc, rows


def generate(
    n_positions: int = 100_000,
    vocab_size: int = 32768,
    k: int = 64,
    seed: int = 0,
    params: SyntheticParams | None = None,
    lengths: Sequence[int] | None = None,
    block: int = 8192,
) -> TeacherCorpus:
    """Generate a top-K teacher corpus of about ``n_positions`` positions.

    ``params`` overrides the defaults; ``vocab_size`` and ``k`` override its fields.
    ``lengths`` fixes the sequence lengths (then ``n_positions`` is ignored).
    """
    params = dataclasses.replace(params or SyntheticParams(), vocab_size=vocab_size, k=k)
    rng, model, lengths, ids_ext, seq_of, pos, doc_ids, doc_start, n_doc, rows = _prepare(
        params, seed, lengths, n_positions
    )
    n = rows.size
    out_ids = np.empty((n, k), dtype=np.int32)
    out_lp = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, block):
        ri = rows[a : a + block]
        cids, zc, top, zt, in_c, tau, beta = _rows(
            model, ids_ext, ri, seq_of, pos, doc_ids, doc_start, n_doc, rng
        )
        # logits are float32 in a real teacher; round them like generate_logits does
        zc = zc.astype(np.float32).astype(np.float64)
        zt = zt.astype(np.float32).astype(np.float64)
        lz = _log_normalizer(model, tau, beta, cids, zc, top, zt, in_c)
        all_ids = np.concatenate([cids, np.broadcast_to(top, (ri.size, top.size))], axis=1)
        all_z = np.concatenate([zc, np.where(in_c, -np.inf, zt)], axis=1)
        part = np.argpartition(-all_z, k - 1, axis=1)[:, :k]
        sub = np.argsort(-np.take_along_axis(all_z, part, axis=1), axis=1, kind="stable")
        order = np.take_along_axis(part, sub, axis=1)
        out_ids[a : a + ri.size] = np.take_along_axis(all_ids, order, axis=1)
        out_lp[a : a + ri.size] = np.take_along_axis(all_z, order, axis=1) - lz[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TeacherCorpus(
        offsets=offsets,
        input_ids=ids_ext[rows].astype(np.int32),
        topk_ids=out_ids,
        topk_logprobs=out_lp,
        vocab_size=vocab_size,
        source=f"synthetic(V={vocab_size},seed={seed})",
        next_ids=ids_ext[rows + 1].astype(np.int32),
    )


def generate_logits(
    lengths: Sequence[int],
    vocab_size: int = 32768,
    k: int = 64,
    seed: int = 0,
    params: SyntheticParams | None = None,
    block: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense logits of the same model: ``(input_ids int32 [N], logits float32 [N, V])``.

    Sequences are concatenated (``N = sum(lengths)``).  ``generate(lengths=lengths, ...)``
    with the same seed/params yields the top-K of ``log_softmax(logits)``.
    """
    params = dataclasses.replace(params or SyntheticParams(), vocab_size=vocab_size, k=k)
    rng, model, lengths, ids_ext, seq_of, pos, doc_ids, doc_start, n_doc, rows = _prepare(
        params, seed, lengths, 0
    )
    n = rows.size
    logits = np.empty((n, vocab_size), dtype=np.float32)
    for a in range(0, n, block):
        ri = rows[a : a + block]
        cids, zc, top, zt, in_c, tau, beta = _rows(
            model, ids_ext, ri, seq_of, pos, doc_ids, doc_start, n_doc, rng
        )
        zt_use = np.where(in_c, tau[:, None] * model.g_id[top][None, :] + beta[:, None], zt)
        sub = max(1, (1 << 25) // vocab_size)  # materialize a few rows at a time
        for b in range(0, ri.size, sub):
            sl = slice(b, b + sub)
            z = tau[sl, None] * model.g_id[None, :] + beta[sl, None]
            z[:, top] = zt_use[sl]
            np.put_along_axis(z, cids[sl], zc[sl], axis=1)
            logits[a + b : a + b + z.shape[0]] = z
    return ids_ext[rows].astype(np.int32), logits
