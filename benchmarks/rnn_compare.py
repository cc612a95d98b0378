"""Book 2 speed table (issue 10): fastbp vs the book's NumPy (fastbp.reference_time, written the book's way)
vs PyTorch eager (CPU), float32, interleaved rounds (the order rotated each round, 0.15 s idle before each timing),
median of per-round ratios.

    python benchmarks/rnn_compare.py                 # every case
    python benchmarks/rnn_compare.py --cases rnnlm,embed --rounds 15
    python benchmarks/rnn_compare.py --cases rnnlm --threads 1 --reps 3    # best of 3 calls per round

Cases (one "iteration" is what the book's trainers do per mini-batch):
  rnnlm    Rnnlm (vocab 10000, wordvec 100, hidden 100), batch 20, time 35: forward, backward, clip_grads(0.25),
           SGD(lr 20).  fastbp: fastbp.time_layers + fastbp.util.clip_grads + fastbp.optimizers.SGD (also with
           the layers' reuse=True workspaces: its ratio is reuse=True time over default time, < 1 when the
           workspaces help).  NumPy: the
           same model on fastbp.reference_time + the book's clip_grads and SGD.  PyTorch: nn.Embedding, nn.LSTM,
           nn.Linear, F.cross_entropy, clip_grad_norm_, optim.SGD (hidden state carried and detached).
  better   BetterRnnlm (2 LSTM layers, hidden/wordvec 650, dropout 0.5, weight tying), batch 20, time 35, same step.
  cbow     CBOW with negative sampling (vocab 10000, hidden 100, window 5, 5 negatives), batch 100, Adam.  fastbp:
           fastbp.negative_sampling_layer.CBOW + fastbp.optimizers.Adam.  NumPy: the book's CBOW (one Embedding per
           context, sample_size + 1 EmbeddingDot, remove_duplicate) on the reference twins + the book's Adam.
           PyTorch: two nn.Embedding, negatives by torch.multinomial without replacement with the target's
           probability zeroed (the book's rule), logsigmoid losses, optim.Adam; and "PyTorch (given negatives)",
           the same model fed negatives drawn by fastbp's sampler (model cost alone).  Where JAX is installed,
           "JAX jit (given negatives)": the same model and Adam as one jitted step, fed fastbp's negatives.
  embed    Embedding backward, dout (700, 100) into a (10000, 100) gradient: fastbp Embedding.backward (zero +
           deterministic scatter) vs the book's dW[...] = 0; np.add.at vs torch dW.zero_(); dW.index_add_.
  book     The book's own Rnnlm class (ch06/rnnlm.py's structure) with fastbp.time_layers swapped in, trained with
           the book's NumPy SGD and clip_grads, vs the same class on the NumPy twins.
"""

import argparse
import platform
import time

import numpy as np

import fastbp.reference as REF
import fastbp.time_layers as TL
from fastbp import negative_sampling_layer as NS
from fastbp import optimizers as FO
from fastbp._book2 import BetterRnnlm, BookAdam, BookCBOW, BookSGD, Rnnlm, book_clip_grads, lstm_init
from fastbp.bench.harness import DEFAULT_GAP
from fastbp.trainer import remove_duplicate
from fastbp.util import clip_grads as fast_clip

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # pragma: no cover
    torch = None


# ---------------------------------------------------------------------------------------------------------------
# models written the book's way (fastbp._book2), over a module of layers, with this benchmark's weights
# ---------------------------------------------------------------------------------------------------------------
def rnnlm(M, vocab_size=10000, wordvec_size=100, hidden_size=100, seed=0):
    V, D, H = vocab_size, wordvec_size, hidden_size
    rn = np.random.default_rng(seed).standard_normal
    E = (rn((V, D)) / 100).astype("f")
    Wx, Wh, b = lstm_init(rn, D, H)
    return Rnnlm(M, E, Wx, Wh, b, (rn((H, V)) / np.sqrt(H)).astype("f"), np.zeros(V, "f"))


def better_rnnlm(M, vocab_size=10000, wordvec_size=650, hidden_size=650, dropout_ratio=0.5, seed=0):
    V, D, H = vocab_size, wordvec_size, hidden_size
    rn = np.random.default_rng(seed).standard_normal
    E = (rn((V, D)) / 100).astype("f")
    lstm1 = lstm_init(rn, D, H)
    lstm2 = lstm_init(rn, H, H)
    return BetterRnnlm(M, E, lstm1, lstm2, np.zeros(V, "f"), dropout_ratio)


def make_step(model, optimizer, clip, max_grad):
    def step(xs, ts):
        loss = model.forward(xs, ts)
        model.backward()
        params, grads = remove_duplicate(model.params, model.grads)
        clip(grads, max_grad)
        optimizer.update(params, grads)
        return loss

    return step


class TorchRnnlm(torch.nn.Module if torch else object):
    def __init__(self, V, D, H, layers=1, dropout=0.0, tie=False):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.drop = torch.nn.Dropout(dropout)
        self.lstm = torch.nn.LSTM(D, H, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0)
        self.affine = torch.nn.Linear(H, V)
        if tie:
            self.affine.weight = self.embed.weight
        self.state = None

    def forward(self, xs, ts):
        h = self.drop(self.embed(xs))
        out, state = self.lstm(h, self.state)
        self.state = tuple(s.detach() for s in state)
        logits = self.affine(self.drop(out))
        return TF.cross_entropy(logits.reshape(-1, logits.shape[-1]), ts.reshape(-1))


def torch_rnnlm_step(model, lr, max_grad):
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(xs, ts):
        opt.zero_grad()
        loss = model(xs, ts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad)
        opt.step()
        return float(loss.detach())

    return step


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------
def run_case(name, impls, rounds, reps, gap=DEFAULT_GAP):
    """impls: list of (label, fn); each round times every fn (reps calls, best of them), in an order rotated by one
    each round, each after `gap` idle seconds and one untimed call, as `fastbp bench` does: the implementation timed
    after NumPy's found NumPy's OpenBLAS threads still spinning (in a fixed order "fastbp reuse=True", timed right
    after NumPy every round, read 1.8x slower than the default layers, with the same layer times measured alone)."""
    times = {label: [] for label, _ in impls}
    for label, fn in impls:  # warm-up
        fn()
        fn()
    for r in range(rounds):
        k = r % len(impls)
        for label, fn in impls[k:] + impls[:k]:
            time.sleep(gap)
            fn()  # untimed: the first call after the gap wakes this implementation's threads
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[label].append(best)
    base = times[impls[0][0]]
    row = {"case": name}
    for label, _ in impls:
        t = np.array(times[label])
        row[label] = float(np.median(t))
        if label != impls[0][0]:
            row[f"ratio {label}"] = float(np.median(t / np.array(base)))
    if "fastbp reuse=True" in times and "PyTorch" in times:  # the workspaces' figure against PyTorch too
        row["ratio PyTorch (fastbp reuse=True)"] = float(
            np.median(np.array(times["PyTorch"]) / np.array(times["fastbp reuse=True"]))
        )
    return row


def _fmt(t):
    return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"


def lm_batches(seed, N=20, T=35, V=10000):
    """The language-model cases' mini-batches: a function cycling over 100 (xs, ts) pairs (N, T) of a random
    corpus of V words (ts: xs shifted by one word)."""
    corpus = np.random.default_rng(seed).integers(0, V, 200000).astype(np.int32)
    state = {"i": 0}

    def batch():
        i = state["i"] = (state["i"] + 1) % 100
        xs = corpus[i * N * T : (i + 1) * N * T].reshape(N, T)
        ts = corpus[i * N * T + 1 : (i + 1) * N * T + 1].reshape(N, T)
        return xs, ts

    return batch


def case_rnnlm(rounds, better=False):
    V = 10000
    batch = lm_batches(1, V=V)

    cls = better_rnnlm if better else rnnlm
    lr, max_grad = 20.0, 0.25
    f_step = make_step(cls(TL), FO.SGD(lr), fast_clip, max_grad)
    reused = cls(TL)
    for layer in reused.layers + [reused.loss_layer]:
        layer.reuse = True
    r_step = make_step(reused, FO.SGD(lr), fast_clip, max_grad)
    n_step = make_step(cls(REF), BookSGD(lr), book_clip_grads, max_grad)
    impls = [
        ("fastbp", lambda: f_step(*batch())),
        ("NumPy", lambda: n_step(*batch())),
        ("fastbp reuse=True", lambda: r_step(*batch())),
    ]
    if torch is not None:
        D = H = 650 if better else 100
        tm = TorchRnnlm(V, D, H, layers=2 if better else 1, dropout=0.5 if better else 0.0, tie=better)
        t_step = torch_rnnlm_step(tm, lr, max_grad)

        def tb():
            xs, ts = batch()
            return t_step(torch.from_numpy(xs.astype(np.int64)), torch.from_numpy(ts.astype(np.int64)))

        impls.append(("PyTorch", tb))
    name = (
        "BetterRnnlm iteration, b20 t35, hidden 650 (2 LSTM, dropout, tied)"
        if better
        else "Rnnlm iteration (fwd, bwd, clip, SGD), b20 t35, V10000 D100 H100"
    )
    return run_case(name, impls, rounds if not better else max(3, rounds // 3), REPS)


def case_cbow(rounds):
    V, H, W, B = 10000, 100, 5, 100
    rng = np.random.default_rng(2)
    corpus = (rng.zipf(1.2, 300000) % V).astype(np.int32)
    corpus[:V] = np.arange(V)
    n = 20000
    contexts = np.stack([corpus[W + o : W + o + n] for o in range(-W, W + 1) if o], axis=1)
    target = corpus[W : W + n]
    state = {"i": 0}

    def batch():
        i = state["i"] = (state["i"] + 1) % (n // B)
        return contexts[i * B : (i + 1) * B], target[i * B : (i + 1) * B]

    fast = NS.CBOW(V, H, W, corpus)
    f_opt = FO.Adam()
    rng_w = np.random.default_rng(0)
    W_in = (0.01 * rng_w.standard_normal((V, H))).astype("f")
    W_out = (0.01 * rng_w.standard_normal((V, H))).astype("f")
    book = BookCBOW(REF, W_in, W_out, W, corpus)
    b_opt = BookAdam()

    def cbow_step(model, opt):
        def step():
            c, t = batch()
            loss = model.forward(c, t)
            model.backward()
            p, g = remove_duplicate(model.params, model.grads)
            opt.update(p, g)
            return loss

        return step

    f_step = cbow_step(fast, f_opt)
    b_step = cbow_step(book, b_opt)

    impls = [("fastbp", f_step), ("NumPy", b_step)]
    if torch is not None:
        emb_in = torch.nn.Embedding(V, H)
        emb_out = torch.nn.Embedding(V, H)
        t_opt = torch.optim.Adam(list(emb_in.parameters()) + list(emb_out.parameters()), lr=0.001)
        word_p = torch.from_numpy(fast.ns_loss.sampler.word_p).float()

        def t_model(c, t, neg):
            h = emb_in(c).mean(dim=1)
            idx = torch.cat([t[:, None], neg], dim=1)
            s = (emb_out(idx) * h[:, None, :]).sum(-1)
            loss = -(TF.logsigmoid(s[:, 0]).mean() + TF.logsigmoid(-s[:, 1:]).mean(0).sum())
            t_opt.zero_grad()
            loss.backward()
            t_opt.step()
            return float(loss.detach())

        def t_step():
            c, t = batch()
            tt = torch.from_numpy(t.astype(np.int64))
            p = word_p.expand(B, V).clone()
            p[torch.arange(B), tt] = 0
            neg = torch.multinomial(p, 5, replacement=False)
            return t_model(torch.from_numpy(c.astype(np.int64)), tt, neg)

        def t_step_given():
            c, t = batch()
            neg = fast.ns_loss.sampler.get_negative_sample(t)
            return t_model(
                torch.from_numpy(c.astype(np.int64)),
                torch.from_numpy(t.astype(np.int64)),
                torch.from_numpy(neg.astype(np.int64)),
            )

        impls += [("PyTorch", t_step), ("PyTorch (given negatives)", t_step_given)]
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        jax = None
    if jax is not None:

        def j_loss(params, c, t, neg):
            W_in, W_out = params
            h = W_in[c].mean(axis=1)
            idx = jnp.concatenate([t[:, None], neg], axis=1)
            s = (W_out[idx] * h[:, None, :]).sum(-1)
            return -(jax.nn.log_sigmoid(s[:, 0]).mean() + jax.nn.log_sigmoid(-s[:, 1:]).mean(0).sum())

        @jax.jit
        def j_step(params, m, v, it, c, t, neg):
            loss, g = jax.value_and_grad(j_loss)(params, c, t, neg)
            it = it + 1
            lr_t = 0.001 * jnp.sqrt(1 - 0.999**it) / (1 - 0.9**it)
            m = [mi + 0.1 * (gi - mi) for mi, gi in zip(m, g)]
            v = [vi + 0.001 * (gi * gi - vi) for vi, gi in zip(v, g)]
            params = [p - lr_t * mi / (jnp.sqrt(vi) + 1e-7) for p, mi, vi in zip(params, m, v)]
            return loss, params, m, v, it

        jst = {"p": [jnp.asarray(fast.params[0]), jnp.asarray(fast.params[1])]}
        jst["m"] = [jnp.zeros_like(p) for p in jst["p"]]
        jst["v"] = [jnp.zeros_like(p) for p in jst["p"]]
        jst["it"] = jnp.float32(0)

        def j_run():
            c, t = batch()
            neg = fast.ns_loss.sampler.get_negative_sample(t)
            loss, jst["p"], jst["m"], jst["v"], jst["it"] = j_step(jst["p"], jst["m"], jst["v"], jst["it"], c, t, neg)
            return float(jax.block_until_ready(loss))

        impls.append(("JAX jit (given negatives)", j_run))
    return run_case("CBOW negative sampling iteration, b100 V10000 H100 window 5 (Adam)", impls, rounds, 3)


def case_embed(rounds):
    V, D, n = 10000, 100, 700
    rng = np.random.default_rng(3)
    W = rng.standard_normal((V, D)).astype("f")
    idx = rng.integers(0, V, n).astype(np.int32)
    dout = rng.standard_normal((n, D)).astype("f")
    from fastbp.layers import Embedding

    fe, re_ = Embedding(W), REF.Embedding(W)
    fe.forward(idx)
    re_.forward(idx)
    impls = [("fastbp", lambda: fe.backward(dout)), ("NumPy", lambda: re_.backward(dout))]
    if torch is not None:
        tg = torch.zeros(V, D)
        ti = torch.from_numpy(idx.astype(np.int64))
        td = torch.from_numpy(dout)

        def tstep():
            tg.zero_()
            tg.index_add_(0, ti, td)

        impls.append(("PyTorch", tstep))
    return run_case("embedding backward 700x100 -> 10000x100 (zero + scatter-add)", impls, rounds, 5)


def case_book(rounds):
    batch = lm_batches(4)

    f_step = make_step(rnnlm(TL), BookSGD(20.0), book_clip_grads, 0.25)
    n_step = make_step(rnnlm(REF), BookSGD(20.0), book_clip_grads, 0.25)
    return run_case(
        "the book's Rnnlm with fastbp.time_layers swapped in (book's SGD, clip_grads) vs untouched",
        [("fastbp", lambda: f_step(*batch())), ("NumPy", lambda: n_step(*batch()))],
        rounds,
        1,
    )


REPS = 1
CASES = {
    "rnnlm": case_rnnlm,
    "better": lambda r: case_rnnlm(r, better=True),
    "cbow": case_cbow,
    "embed": case_embed,
    "book": case_book,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for fastbp and PyTorch alike (default: each library's own default)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=1,
        help="Rnnlm/BetterRnnlm: calls per implementation per round, the best one kept (a loaded machine's outliers)",
    )
    args = ap.parse_args(argv)
    global REPS
    REPS = max(1, args.reps)
    if args.threads > 0:
        from fastbp import _blas, _threads

        _threads._set_num_threads(args.threads)
        _blas.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        cpu += ", AVX-512" if "avx512f" in info else ", no AVX-512"
    except (OSError, StopIteration):
        pass
    from fastbp import _threads

    print(
        f"CPU: {cpu} ({platform.machine()}); fastbp {_threads._get_num_threads()} threads; "
        f"torch {torch.__version__ if torch else 'not installed'}"
        f"{f', {torch.get_num_threads()} threads' if torch else ''}; {args.rounds} interleaved rounds "
        f"(rotated, {DEFAULT_GAP:g} s idle before each timing), medians"
    )
    rows = []
    for name in args.cases.split(","):
        row = CASES[name](args.rounds)
        rows.append(row)
        labels = [k for k in row if k != "case" and not k.startswith("ratio")]
        parts = [f"{k} {_fmt(row[k])}" for k in labels]
        ratios = [f"x{row[k]:.2f} vs {k[6:]}" for k in row if k.startswith("ratio")]
        print(f"| {row['case']} | " + " | ".join(parts) + " | fastbp speed-up: " + ", ".join(ratios) + " |", flush=True)
    return rows


if __name__ == "__main__":
    main()
