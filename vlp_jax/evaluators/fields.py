"""Declared fields of each `config.evals.<name>`, chosen by its `type` (see
`vlp_jax.config_schema`); the readers are the evaluators of this package."""
from vlp_jax.config_schema import Field, Seq, declare
from vlp_jax.evaluators import itm_rerank, retrieval, zero_shot

declare(
    "evaluator", None,
    split=Field(str, doc="the split evaluated ('test', 'validation')"),
    max_examples=Field(int, None, doc="None: the whole split"),
    batch_size=Field(int, 256, doc="encoder batch"),
    log_steps=Field(int, None, doc="also run every N training steps (None/0: only at the end)"),
)
declare("evaluator", "zero_shot", ks=Field(Seq(int), zero_shot.DEFAULT_KS))
declare("evaluator", "retrieval", ks=Field(Seq(int), retrieval.DEFAULT_KS),
        chunk_size=Field(int, retrieval.DEFAULT_CHUNK, doc="captions scored per block"))
declare(
    "evaluator", "itm_rerank_retrieval",
    k=Field(int, itm_rerank.DEFAULT_K, doc="ITC candidates re-ranked by the ITM head"),
    ks=Field(Seq(int), retrieval.DEFAULT_KS), add_itc=Field(bool, False), seed=Field(int, 0),
    timing_pairs=Field(int, None, doc="pairs timed for the N x M cost (None: 4 * batch_size)"),
    full_max_pairs=Field(int, 0, doc="score all N x M pairs when there are at most this many"),
)
declare("evaluator", "compositional", use_itm=Field(bool, True),
        tie_tolerance=Field(float, 1e-5))
declare("evaluator", "captioning",
        log_examples=Field(int, 4, doc="generated captions written to the log"))
declare("evaluator", "likelihood_zero_shot",
        template=Field(int, 0, doc="index of the prompt template scored"))
declare("evaluator", "text_tasks",
        seed=Field(int, 0, doc="seed of the generator drawing the task inputs"),
        questions_per_scene=Field(int, 2, doc="VQA questions asked per scene"))
