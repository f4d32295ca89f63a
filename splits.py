"""The federated split: how fedavg.py spreads the training set over its K clients.

A split is ONE value, its name: 'iid', 'nc5' (every client holds 5 classes), 'dir0.1' (each class spread
over the clients in Dirichlet(0.1) proportions). One class per kind holds everything about it: its name
grammar, its label for titles and tables ('IID', 'Nc=5', 'Dir(0.1)'), its place in the tables' order, its
fedavg.py flag(s) and their checks, and its shard function. The kinds register themselves (KINDS), and
everything else reaches them through the functions at the bottom: fedavg.py (add_flags, check_flags,
of_args, make_shards, label_skew, shard_rows), run names and result.json ("split": split_name), the study's
planner (split_flags, split_label) and the summary (canonical, split_order, split_label).

A new kind is one class here and one test: docs/extending.md.
"""
import argparse

import numpy as np
import torch

import common
import plumbing


KINDS = []  # the kinds, in the order they were defined: their flags' order in --help and in run names


class Split:
    """One kind of split; an instance is one split of that kind. A kind declares:

    prefix   its names are prefix + value ('nc5', 'dir0.1'); a kind without a value (IID) is its prefix alone
    flag     its fedavg.py flag; the flag's dest holds the value in args and config.json
    value_type  the flag's argparse type (a name's value is parsed with it too); None: a switch, no value;
             valid / bounds: the values it takes (checked for the flag and for names), and in words
    example  a name of this kind: for error messages, and the registry's tests run every kind through it
    rank     where its runs sit in tables: IID first, then the kinds from near IID to most heterogeneous

    and defines shards(labels, k, gen) and label. Where it has more flags than `flag` (Dirichlet's
    --min-shard) it adds them in add_flags, lists their dests in `more_flags` with their defaults in
    `defaults`, and checks them in check. Within a kind, splits sort by -value: a larger value nearer IID
    (more classes per client, a larger alpha); a kind where it is the other way round overrides `order`."""
    prefix = flag = value_type = None
    example = None
    rank = 0
    more_flags = ()
    defaults = {}
    help = ""
    metavar = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        KINDS.append(cls)

    def __init__(self, value=None, **more):
        self.value = value
        for k in self.more_flags:
            setattr(self, k, more.get(k, self.defaults[k]))

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    # ---- the kind's flags

    @classmethod
    def dest(cls):
        return cls.flag.lstrip("-").replace("-", "_")

    @classmethod
    def help_text(cls):
        return cls.help

    @classmethod
    def add_flags(cls, g):
        if cls.value_type is None:
            g.add_argument(cls.flag, action="store_true", help=cls.help_text())
        else:
            g.add_argument(cls.flag, type=cls.value_type, default=None, metavar=cls.metavar, help=cls.help_text())

    @classmethod
    def given(cls, config):
        """Whether `config` (args' or config.json's values) chooses this kind."""
        v = config.get(cls.dest())
        return v is not None and v is not False

    @classmethod
    def valid(cls, value):
        """Whether a value parsed from a flag or a name is one this kind takes."""
        return True

    @classmethod
    def bounds(cls):
        """What `valid` asks, for error messages: 'in 1..100'."""
        return ""

    @classmethod
    def check(cls, p, args, chosen):
        """fedavg.py's checks of this kind's flags (p.error); `chosen`: this run's split is of this kind."""
        if chosen and cls.value_type is not None and not cls.valid(getattr(args, cls.dest())):
            p.error(f"{cls.flag} must be {cls.bounds()}, got {getattr(args, cls.dest())}")

    @classmethod
    def from_text(cls, text):
        """The split of this kind named prefix + text, its value read as its flag reads it (so 'nc05' is Nc(5):
        parse_split refuses such a spelling)."""
        if cls.value_type is None:
            if text:
                raise ValueError(text)
            return cls()
        return cls(cls.value_type(text))

    @classmethod
    def from_config(cls, config):
        return cls(None if cls.value_type is None else config[cls.dest()],
                   **{k: config[k] for k in cls.more_flags if config.get(k) is not None})

    # ---- one split

    @property
    def name(self):
        return self.prefix if self.value_type is None else f"{self.prefix}{plumbing.name_value(self.value)}"

    @property
    def argv(self):
        """fedavg.py's flags for this split (those its name holds; other flags at their defaults)."""
        return [self.flag] if self.value_type is None else [self.flag, plumbing.name_value(self.value)]

    @property
    def order(self):
        return (self.rank, 0 if self.value is None else -self.value)

    @property
    def label(self):
        raise NotImplementedError

    def shards(self, labels, k, gen):
        """The K clients' shards: sorted sample indices of `labels`, disjoint, covering all of them; every
        random number drawn from `gen` (one seed, one split)."""
        raise NotImplementedError


class IID(Split):
    """Every class shuffled, the classes laid end to end, then dealt round-robin to the K clients:
    client sizes differ by at most 1, and each client holds about count_c / K samples of class c."""
    prefix, flag, rank, example = "iid", "--iid", 0, "iid"

    @classmethod
    def help_text(cls):
        return f"IID shards (what a run without {' or '.join(k.flag for k in KINDS if k is not cls)} gets)"

    @property
    def label(self):
        return "IID"

    def shards(self, labels, k, gen):
        order = []
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).flatten()
            order.append(idx[torch.randperm(len(idx), generator=gen)])
        order = torch.cat(order)
        return [torch.sort(order[i::k]).values for i in range(k)]


class Nc(Split):
    """Every client holds exactly `nc` classes. The K*nc (client, class) slots are filled with the
    classes in a seeded random order, cycling: slot s takes class perm[s % num_classes]. So every class
    goes to floor or ceil of K*nc/num_classes clients, and a client never gets a class twice (nc <=
    num_classes). Each class's samples are shuffled and cut into near-equal pieces, one per holder.
    With balanced classes and num_classes dividing K*nc (CIFAR-100, K=100) all shards are equal."""
    prefix, flag, rank, metavar, example = "nc", "--nc", 2, "NC", "nc5"
    value_type = int
    help = "non-IID: every client holds exactly NC classes"

    @classmethod
    def valid(cls, value):
        return 1 <= value <= common.NUM_CLASSES

    @classmethod
    def bounds(cls):
        return f"in 1..{common.NUM_CLASSES}"

    @classmethod
    def check(cls, p, args, chosen):
        super().check(p, args, chosen)
        if chosen and args.k * args.nc < common.NUM_CLASSES:
            p.error(f"--k x --nc must be >= {common.NUM_CLASSES} so that every class (every sample) has a client")

    @property
    def label(self):
        return f"Nc={self.value}"

    def shards(self, labels, k, gen):
        classes = torch.unique(labels)
        perm = classes[torch.randperm(len(classes), generator=gen)].tolist()
        holders = {c: [] for c in perm}
        for client in range(k):
            for i in range(self.value):
                holders[perm[(client * self.value + i) % len(perm)]].append(client)
        shards = [[] for _ in range(k)]
        for c in sorted(holders):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx) < len(holders[c]):
                raise plumbing.UserError(f"class {c} has {len(idx)} samples for {len(holders[c])} clients; "
                                         f"use fewer clients (--k) or classes per client (--nc)")
            idx = idx[torch.randperm(len(idx), generator=gen)]
            for client, piece in zip(holders[c], torch.tensor_split(idx, len(holders[c]))):
                shards[client].append(piece)
        return [torch.sort(torch.cat(s)).values for s in shards]


def dirichlet_draw(by_class, k, alpha, gen, rng):
    """One Dirichlet split of the samples `by_class` (a list of each class's indices): for every class,
    client proportions p ~ Dir(alpha) over the K clients (numpy's sampler `rng`, seeded from `gen`), and the
    class's shuffled samples cut at round(cumsum(p) * count). This per-class-over-clients scheme is
    Yurochkin et al. 2019's and NIID-Bench's (Li et al. 2022), as flwr-datasets' DirichletPartitioner
    draws it (Hsu et al. 2019 instead draw a class mixture per client)."""
    samples, owners = [], []
    for idx, p in zip(by_class, rng.dirichlet(np.full(k, alpha), size=len(by_class))):
        samples.append(idx[torch.randperm(len(idx), generator=gen)])
        cuts = np.round(np.cumsum(p) * len(idx))[:-1]  # client c gets positions cuts[c-1] to cuts[c]
        owners.append(np.searchsorted(cuts, np.arange(len(idx)), side="right"))
    samples, owners = torch.cat(samples), torch.from_numpy(np.concatenate(owners))
    order = torch.argsort(owners * (int(samples.max()) + 1) + samples)  # by client, then by sample
    return list(torch.split(samples[order], torch.bincount(owners, minlength=k).tolist()))


class Dirichlet(Split):
    """Dir(alpha): a Dirichlet split (dirichlet_draw) in which every client holds at least `min_shard`
    samples: drawn again, from the same stream, until one is (at most DRAWS times, then a UserError)."""
    prefix, flag, rank, metavar, example = "dir", "--dirichlet", 1, "ALPHA", "dir0.1"
    value_type = staticmethod(plumbing.positive_float)
    more_flags = ("min_shard",)
    MIN_SHARD = 10  # flwr-datasets' DirichletPartitioner's default min_partition_size
    defaults = {"min_shard": MIN_SHARD}
    DRAWS = 100
    # Above this the proportions are 1/K to within about 1/sqrt(alpha) = 0.1%: every draw is the even split
    # (and at ~1e306 numpy's sampler overflows to all-zero proportions)
    MAX_ALPHA = 1e6
    # From here on a client's proportion of a class is 1/K within about 1/sqrt(alpha) = 10%: a larger alpha
    # hardly evens the shards out any more (with fewer samples of a class than clients it does not at all:
    # every class is then cut at the same places), so a failed draw does not advise "raise --dirichlet"
    EVEN_ALPHA = 100.0
    help = (f"non-IID: each class's samples go to the clients in proportions drawn from Dirichlet(ALPHA) "
            f"(small: a few clients hold most of a class; large: near IID; at most {MAX_ALPHA:g})")

    @classmethod
    def add_flags(cls, g):
        super().add_flags(g)
        g.add_argument("--min-shard", type=plumbing.positive_int, default=cls.MIN_SHARD,
                       help=f"with --dirichlet: the fewest samples a client may hold; a split with a smaller "
                            f"shard is drawn again, up to {cls.DRAWS} times")

    @classmethod
    def valid(cls, value):
        return 0 < value <= cls.MAX_ALPHA

    @classmethod
    def bounds(cls):
        return (f"at most {cls.MAX_ALPHA:g} (beyond it every draw is the even split, each class's proportions 1/K "
                f"within 0.1%: for that, --iid)")

    @classmethod
    def check(cls, p, args, chosen):
        super().check(p, args, chosen)
        if not chosen:
            plumbing.refuse_ignored(p, args, ["min_shard"], "it bounds the shards of --dirichlet")

    @property
    def label(self):
        return f"Dir({plumbing.name_value(self.value)})"

    def shards(self, labels, k, gen):
        alpha, least = self.value, self.min_shard
        if k * least > len(labels):
            raise plumbing.UserError(f"--k {k} clients x --min-shard {least} > {len(labels)} training images; "
                                     f"lower --k or --min-shard")
        by_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
        for _ in range(self.DRAWS):
            shards = dirichlet_draw(by_class, k, alpha, gen, rng)
            if min(map(len, shards)) >= least:
                return shards
        advice = ("raise --dirichlet (more even shards) or lower --k or --min-shard" if alpha < self.EVEN_ALPHA else
                  f"a larger --dirichlet hardly evens the shards out any more (on average {len(labels) / k:.4g} "
                  f"samples each): lower --k or --min-shard")
        raise plumbing.UserError(f"--dirichlet {plumbing.name_value(alpha)}: none of {self.DRAWS} draws gave every "
                                 f"one of the {k} clients {least}+ samples; {advice}")


# ----------------------------------------------------------------------------- a split from flags or a name

def of_config(config):
    """The split that flags choose: `config` is args' values (vars(args)) or a config.json dict. No kind's
    flag given: IID."""
    chosen = [kind for kind in KINDS if kind.given(config)]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(kind.flag for kind in chosen)} exclude each other")
    return (chosen or [IID])[0].from_config(config)


def of_args(args):
    return of_config(vars(args))


def add_flags(g):
    """fedavg.py's split flags, every kind's, into the argparse group g."""
    for kind in KINDS:
        kind.add_flags(g)


def check_flags(p, args):
    """fedavg.py's checks of the split flags: at most one kind chosen, and each kind's own checks."""
    try:
        chosen = type(of_args(args))
    except ValueError as e:
        p.error(str(e))
    for kind in KINDS:
        kind.check(p, args, kind is chosen)


def parse_split(name):
    """The split a name names: 'iid' -> IID(), 'nc5' -> Nc(5), 'dir0.1' -> Dirichlet(0.1). ValueError for
    anything else, a non-standard spelling of a split included ('nc05', 'nc 7', 'nc1_0', 'dir0.10', a
    non-ASCII digit), which would otherwise be a second name (a second table row) for one split."""
    kind = next((k for k in KINDS if name.startswith(k.prefix)), None)  # no prefix starts another (tested)
    try:
        split = kind and kind.from_text(name[len(kind.prefix):])
    except (ValueError, argparse.ArgumentTypeError):
        split = None
    if split is None:
        raise ValueError(f"not a split name: {name!r} (e.g. {', '.join(k.example for k in KINDS)})")
    if not split.valid(split.value):
        raise ValueError(f"not a split name: {name!r} ({split.flag} must be {split.bounds()})")
    if split.name != name:
        raise ValueError(f"{name!r} is not the standard spelling of the split {split.name!r}: write {split.name}")
    return split


def canonical(name):
    """`name` if it is a split's standard name; ValueError otherwise (parse_split)."""
    return parse_split(name).name


def split_name(**flags):
    """The split's name from fedavg.py's flags: split_name() == 'iid', split_name(nc=5) == 'nc5',
    split_name(dirichlet=0.1) == 'dir0.1' (exact: 0.1 and 0.1000001 differ)."""
    return of_config(flags).name


def split_flags(name):
    """fedavg.py's flags for a split name: 'nc5' -> ['--nc', '5']."""
    return parse_split(name).argv


def split_order(name):
    """Sort key: IID first, then Dirichlet from large alpha (near IID) to small, then Nc from many classes
    per client to one (the most heterogeneous last)."""
    return parse_split(name).order


def split_label(name):
    """For titles and tables: 'IID', 'Nc=5', 'Dir(0.1)'; two names never share a label."""
    return parse_split(name).label


# ----------------------------------------------------------------------------- shards

def make_shards(labels, split, k, seed):
    """The K clients' shards of `split` (a Split): lists of sample indices into `labels`. The same seed
    gives the same shards (plumbing.stream "shards")."""
    if k > len(labels):
        raise plumbing.UserError(f"--k {k} clients for {len(labels)} training images: some would hold nothing; "
                                 f"lower --k")
    return split.shards(labels, k, plumbing.stream("shards", seed))


def client_tv(shards, labels):
    """Per client, the total-variation distance between its label distribution p_i and the global one q
    (that of all the clients' samples together): TV_i = 1/2 sum_c |p_i(c) - q(c)|, in [0, 1 - min_c q(c)]."""
    counts = torch.stack([torch.bincount(labels[s], minlength=int(labels.max()) + 1) for s in shards]).double()
    p = counts / counts.sum(1, keepdim=True)
    q = counts.sum(0) / counts.sum()
    return 0.5 * (p - q).abs().sum(1)


def label_skew(shards, labels):
    """The split's label skew: the mean over clients (each counting once) of client_tv. 0 when every client
    holds the global label distribution (IID, up to the rounding of small shards); 1 - N/C for N of C
    balanced classes per client (Nc=N), so 1 - 1/C, its largest value on balanced classes, when every client
    holds one class. Nc and Dirichlet splits sit on this one axis."""
    return float(client_tv(shards, labels).mean())


def shard_rows(shards, labels):
    """shards.csv: per client its samples, its classes, its label_tv (client_tv) and the share of its largest
    class (1 when it holds one class; about 1/classes when its classes are balanced)."""
    rows = []
    for i, (s, tv) in enumerate(zip(shards, client_tv(shards, labels).tolist())):
        counts = torch.bincount(labels[s])
        rows.append({"client": i, "samples": len(s), "classes": int((counts > 0).sum()), "label_tv": tv,
                     "largest_class_share": float(counts.max()) / len(s)})
    return rows


# ----------------------------------------------------------------------------- what the other files read

# The config.json keys that define a split (a FedAvg run's flags that decide its shards, with --seed)
SPLIT_FLAGS = tuple(f for kind in KINDS for f in (kind.dest(), *kind.more_flags))
# The config.json keys a split's name holds: the run name's core and the tables' split column show them
NAME_FLAGS = tuple(kind.dest() for kind in KINDS)
