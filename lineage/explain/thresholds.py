"""Every threshold a verdict uses, defined once, each with its reason.

The verdict words must mean the same thing whoever reads the code: these
numbers are the definitions in README "What the verdicts mean".
"""

from __future__ import annotations

#: z at which a matrix counts as significantly related to a candidate. z is in
#: standard deviations of the permutation null (lineage/null.py); over 588
#: matrices of unrelated trained pairs the largest |z| seen was 3.4.
Z_SIG = 6.0
#: A candidate is related when at least this fraction of the suspect's
#: matrices reach Z_SIG: the verdict never rests on one matrix.
RELATED_FRAC = 0.5
#: Unrelated needs every candidate at most this fraction significant...
UNRELATED_FRAC = 0.05
#: ...and at least this fraction of the suspect's elements compared.
MIN_COVERAGE = 0.5
#: Identical needs this fraction of the suspect's float elements within rounding.
IDENTICAL_COVERAGE = 0.9
#: A blend must leave at most this fraction of the best single parent's
#: residual (median over matrices): two fine-tunes of one base have correlated
#: deltas, so their blend fits a little better than either, not 30% better.
BLEND_GAIN = 0.7
#: ...a sparsified merge (TIES/DARE), whose drop pattern is noise to a linear
#: fit, at most this fraction.
SPARSE_GAIN = 0.9
#: ...and, with no base among the candidates (the suspect coinciding with each parent is then
#: the only sign of a sparse merge), at most this: mergekit-style TIES and DARE at weight =
#: density leave 0.70-0.74, a fine-tune fitted on two of its siblings 0.87-0.90.
SPARSE_NO_BASE_GAIN = 0.8
#: After the merge (explain/aftermerge.py): a matrix was changed when the blend leaves
#: more than this many times the storage rounding (RMS) of its result...
AFTER_CHANGED = 2.0
#: ...and a change is `uniform` (noise-like) when the relative residual varies across
#: matrices by at most this coefficient of variation.
AFTER_UNIFORM_CV = 0.25
#: A sparsified merge is recognised by the suspect coinciding, within storage
#: rounding, with the base and each parent on at least this median fraction of
#: elements (dropped and kept deltas leave exactly that).
SPARSE_NEAR = 0.15
#: A blend parent's weight must reach this, with a 95% interval above 0; a
#: candidate this far below 0 with its interval below 0 is a task-arithmetic base.
MIN_WEIGHT = 0.05
#: A suspect closest to X is derived from the declared base B instead when it
#: went less than this far along the way from B to X (explain/derived.py).
THROUGH = 0.75
#: Without a declared base, a derived suspect whose parent's weight in the
#: blend over its related candidates exceeds another's by less than this sits between
#: them (a sibling of both weighs 1/k on each of k, whatever their deltas' correlation):
#: no parent is named (explain/siblings.py).
SPLIT_MARGIN = 0.2
#: A blend's weights must agree within the groups one merge setting covers (a
#: layer's attention matrices, its MLP matrices; explain/schedule.py): weighted
#: SD within groups at most this. Across layers and components they may follow
#: any schedule, which the verdict reports.
MAX_WITHIN_SD = 0.1
#: A schedule reproduces a group's weight within this (or 3 standard errors).
SCHEDULE_TOL = 0.03
#: A merge trained (or sparsified) afterwards leaves more residual: up to this
#: fraction of the best single parent's is a blend when two or more parents
#: each carry at least TRAINED_MIN_WEIGHT (interval lower end) and the other
#: related candidates (the base) at most TRAINED_MAX_BASE: a merge carries its
#: parents' deltas whole, a sibling's fit shrinks toward the base (0.22-0.39
#: in the evaluation set). DARE at density p leaves sqrt(1 - p) of it by design
#: (0.71 at 0.5, 0.89 at 0.2) before any training.
TRAINED_GAIN = 0.9
TRAINED_MIN_WEIGHT = 0.2
TRAINED_MAX_BASE = 0.1
#: Model Stock (explain/model_stock.py): the base's fitted weight must match the formula's
#: prediction, and the fine-tunes' weights each other, within this on the median matrix.
MODEL_STOCK_TOL = 0.01
#: Dropped-delta energy ratio (explain/sparse.py): TIES trims the smallest
#: deltas (0.31-0.33 for mergekit ties at density 0.5), DARE drops at random
#: (0.93-0.94 for mergekit dare_ties and dare_linear, at weights 0.5 / 0.5 and
#: 0.6 / 0.4), DELLA at random with a probability rising with the delta's
#: magnitude rank (0.84-0.86 for mergekit della and della_linear, epsilon 0.1):
#: below "della_max" a random drop is DELLA's.
SPARSE_FAMILY = {"ties_max": 0.5, "dare_min": 0.75, "della_max": 0.9}
#: A DARE merge elected signs (dare_ties) when the suspect follows its parents' deltas,
#: where they disagree in sign, more strongly than where they agree: the ratio of the two
#: fits' summed coefficients, less SIGN_ELECTION["se"] standard errors, above
#: "elected_min" (mergekit dare_ties at density 0.5: 1.16; at 0.2 with weights 0.7/0.3,
#: 1.02-1.04 in simulation); it added every kept delta (mergekit dare_linear and a torch
#: DARE: 1.007-1.010, standard error 0.004)
#: when the ratio plus that margin is below "linear_max"; in between, not told.
#: Measured on at least "min_conflict" elements where the deltas disagree.
SIGN_ELECTION = {"elected_min": 1.03, "linear_max": 1.025, "se": 3.0, "min_conflict": 20000}
#: With two parents, the sharper test (lineage/consensus.py): the share of kept elements where
#: both deltas were added, where the parents' deltas conflict in sign over where they agree. An
#: elected merge never adds opposite deltas (0.000 for mergekit ties, dare_ties,
#: breadcrumbs_ties and della at density 0.5), a linear one does (0.58 for breadcrumbs,
#: 0.88 della_linear, 0.97-0.99 dare_linear): elected when the interval (3 Poisson standard
#: errors on each count) lies below "elected_max", not when above "linear_min", measured on at
#: least "min_kept" kept elements where the deltas conflict and "min_combined" added ones where
#: they agree.
COMBINED = {"elected_max": 0.1, "linear_min": 0.25, "min_kept": 2000, "min_combined": 200}
#: Where both deltas were kept and agree, the suspect's delta fitted on the two deltas, each
#: times its factor, gives coefficients summing to 2 (added) or 1 (divided by the weights
#: kept: mergekit's `normalize`), each within "normalized_within". A parent's kept deltas
#: are a band of magnitudes (TIES, breadcrumbs) when the band holds at least "band_agreement"
#: of the kept elements and leaves out as much of the dropped ones (0.94-1.00 for mergekit ties
#: and breadcrumbs and a torch TIES, 0.23-0.37 for DARE and DELLA); breadcrumbs when more than "gamma_min" of the elements
#: lie above it. Densities within "snap" of a multiple of 0.05 are written as that multiple.
#: None of this is read when that fit leaves more than "added_residual_max" of the suspect's
#: delta energy there (a clean merge leaves storage rounding, 1e-5 relative; training after
#: the merge leaves far more).
#: SCE keeps the same elements of every parent: where the parents' deltas agree, all but a
#: sliver of the kept elements added both (0.9999 for mergekit sce); below "shared_min", each
#: parent had its own mask (0.33 for DARE at density 0.5, 0.70 for TIES).
KEPT = {
    "normalized_within": 0.25,
    "band_agreement": 0.8,
    "gamma_min": 0.002,
    "snap": 0.01,
    "added_residual_max": 0.01,
    "shared_min": 0.97,
    "rising_min": 0.04,
    "epsilon_snap": 0.02,
    "lambda_within": 0.05,
    "zero_min": 0.002,
    "alone_min": 0.05,
    "confirm_residual_max": 0.002,
}
#: ("zero_min", "alone_min") A suspect that the linear fit does not make a sparse blend (DARE
#: at density 0.2 leaves 0.9 of the residual; at 0.8 only 4% of elements keep the base's value)
#: is one when, element by element, at least "zero_min" of the precisely measured elements hold
#: the base's value, at least "alone_min" each parent's delta alone, and the rest the two added
#: within "confirm_residual_max" (a fine-tune or a dense merge holds no parent's delta alone;
#: mergekit's sparse merges leave 2e-5, a mergekit task_arithmetic of two MoE fine-tunes whose
#: deltas largely coincide 5e-3, with 6-9% of its elements looking like one delta alone).
#: ("rising_min") A random merge's kept rate against the delta's magnitude rank in its row: DELLA's
#: rises by 2 epsilon (0.17-0.20 for mergekit della and della_linear at epsilon 0.1, standard
#: error 0.009), DARE's is flat (within 0.01). Rising by more than "rising_min" and 3 standard
#: errors: DELLA; within half that (or 3 standard errors) of flat: DARE. Its epsilon is written
#: as the multiple of 0.05 within "epsilon_snap" (0.083-0.101 measured for 0.1), and lambda
#: only when it differs from 1 by more than "lambda_within".
#: A passthrough (layer stack) takes whole matrices from at least two
#: candidates, each supplying at least this share of the elements.
PASSTHROUGH_MIN_SHARE = 0.1
#: Slerp is told from linear interpolation when the free coefficients' excess
#: over 1 is what the angle predicts within this ratio...
SLERP_RATIO = (0.5, 2.0)
#: ...and the predicted excess is at least this many standard errors.
SLERP_MIN_SE = 3.0

NULL = (
    "permutation null: the covariance of suspect and candidate when the candidate's rows and columns are shuffled "
    "(an unrelated matrix with the same row and column structure), mean 0, sd in closed form from row and column "
    "sums; z = covariance / sd (1/sqrt(n) of correlation without structure)"
)

# Refiners (layer maps, permutations): when to look, and what to accept.
#: A matrix is "unmatched" (worth a permutation search) when its correlation
#: with the parent is below this fraction of what the parent's matched
#: matrices reach...
UNMATCHED_CORR = 0.5
#: ...measured as this quantile of the per-matrix correlations: a median would
#: fall with many permuted matrices.
TYPICAL_CORR_QUANTILE = 0.9
#: Fraction of rows the layer map reads per pair of layers (sampled).
LAYERMAP_SAMPLE = 0.05
#: Matrix roles (the largest shared ones) compared per pair of layers.
LAYERMAP_ROLES = 2
#: Candidates every suspect layer is compared with (the parent, then the most related).
LAYERMAP_CANDIDATES = 4
#: Most matrices a permutation search reads whole...
MAX_PERMUTATION_SEARCH = 512
#: ...each of at most this many elements (read whole by one worker).
MAX_PERMUTATION_ELEMENTS = 1 << 26
#: Gauge (explain/gauge.py): a candidate's embedding must fit the suspect's at least this
#: well once rotated (an unrelated model's reached 0.30 with 1,000 rows of hidden size
#: 128, a disguised copy 1.0), and at least this much better than as it is, before the
#: other matrices are refitted in the transformed gauge.
GAUGE_MIN_CORR = 0.5
GAUGE_MIN_GAIN = 0.2
#: Invariant products (explain/invariants.py) of unrelated models are more alike under the
#: permutation null than plain matrices are (low-rank products of shared probes): over 360
#: products of 30 ordered pairs of the evaluation's unrelated trained models their z had
#: sd 2.0 and max |z| 5.6. A product counts as significant at twice Z_SIG.
INVARIANT_Z_SIG = 12.0
