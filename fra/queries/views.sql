-- FRA views over an index. The base views rows, pairs, channels, samples, features are created
-- by fra.queries.connect() over the index's hive-partitioned Parquet (layer, head columns).

-- Per head and corpus: totals of the feature x feature terms (from the exact per-pair sums).
CREATE OR REPLACE VIEW head_totals AS
SELECT layer, head,
       sum(ff) AS ff_total,
       sum(ff_abs) AS ff_abs_total,
       sum(kept_abs) AS kept_abs_total,
       count(*) AS n_pairs
FROM pairs
GROUP BY layer, head;

-- One row per channel (layer, head, feat_q, feat_k): mean-when-active and friends. The macro takes
-- one layer / head (NULL for all) and pushes it into both scans, so a question about one head
-- reads only that head's partitions of channels and pairs.
CREATE OR REPLACE MACRO channel_stats_at(lyr, hd) AS TABLE
SELECT c.layer, c.head, c.feat_q, c.feat_k, c.count,
       c.sum / c.count AS mean,
       sqrt(greatest(c.sumsq / c.count - (c.sum / c.count) ^ 2, 0)) AS std,
       c.sum,
       c.ind_count,
       CASE WHEN c.ind_count > 0 THEN c.ind_sum / c.ind_count END AS ind_mean,
       CASE WHEN c.count > c.ind_count THEN (c.sum - c.ind_sum) / (c.count - c.ind_count) END AS other_mean,
       CASE WHEN c.ind_count > 0 AND c.count > c.ind_count
            THEN c.ind_sum / c.ind_count - (c.sum - c.ind_sum) / (c.count - c.ind_count) END AS ind_diff,
       c.sum / nullif(t.ff_total, 0) AS share_of_head,
       abs(c.sum) / nullif(t.ff_abs_total, 0) AS abs_share_of_head,
       c.feat_q = c.feat_k AS self_pair
FROM (SELECT * FROM channels WHERE (lyr IS NULL OR layer = lyr) AND (hd IS NULL OR head = hd)) c
JOIN (SELECT layer, head, sum(ff) AS ff_total, sum(ff_abs) AS ff_abs_total FROM pairs
      WHERE (lyr IS NULL OR layer = lyr) AND (hd IS NULL OR head = hd) GROUP BY layer, head) t
  USING (layer, head);

CREATE OR REPLACE VIEW channel_stats AS SELECT * FROM channel_stats_at(NULL, NULL);

-- Features flagged as BOS or punctuation (used by the optional filter of top_channels).
CREATE OR REPLACE VIEW noise_features AS
SELECT layer, feature FROM features WHERE punct_or_bos;

-- Per head, channels ranked by |mean-when-active|; lyr / hd NULL for every layer / head.
CREATE OR REPLACE MACRO top_channels(lyr, hd, min_count, drop_noise, n) AS TABLE
WITH cand AS (
  SELECT s.* FROM channel_stats_at(lyr, hd) s WHERE s.count >= min_count
), noise AS (
  SELECT layer, feature FROM noise_features WHERE drop_noise AND (lyr IS NULL OR layer = lyr)
)
, top AS (  -- a top-n aggregate per head, not a sort of every channel; ties: smaller feat_q, feat_k
  SELECT c.layer, c.head,
         max_by(struct_pack(feat_q := c.feat_q, feat_k := c.feat_k, count := c.count, mean := c.mean, std := c.std,
                            sum := c.sum, ind_count := c.ind_count, ind_mean := c.ind_mean, other_mean := c.other_mean,
                            ind_diff := c.ind_diff, share_of_head := c.share_of_head,
                            abs_share_of_head := c.abs_share_of_head, self_pair := c.self_pair),
                struct_pack(v := abs(c.mean), q := -c.feat_q, k := -c.feat_k), n) AS best
  FROM cand c
  ANTI JOIN noise nq ON nq.layer = c.layer AND nq.feature = c.feat_q
  ANTI JOIN noise nk ON nk.layer = c.layer AND nk.feature = c.feat_k
  GROUP BY c.layer, c.head
)
SELECT layer, head, unnest(best, recursive := true), generate_subscripts(best, 1) AS rank FROM top;

-- Every channel in which a feature appears, on the query side or the key side.
CREATE OR REPLACE MACRO feature_lookup(feat, lyr) AS TABLE
SELECT CASE WHEN feat_q = feat AND feat_k = feat THEN 'both' WHEN feat_q = feat THEN 'query' ELSE 'key' END AS side, *
FROM channel_stats_at(lyr, NULL)
WHERE (feat_q = feat OR feat_k = feat);

-- The largest single kept contributions anywhere, with the tokens at q and k. The macro takes the
-- number wanted, so that only that many rows are joined with the samples; the view holds 1000.
CREATE OR REPLACE MACRO top_entries_n(n) AS TABLE
SELECT r.layer, r.head, r.sample, r.q, r.k, r.feat_q, r.feat_k, r.value, r.induction,
       s.tokens[r.q + 1] AS token_q, s.tokens[r.k + 1] AS token_k
FROM (SELECT * FROM rows ORDER BY abs(value) DESC LIMIT n) r JOIN samples s USING (sample)
ORDER BY abs(r.value) DESC;

CREATE OR REPLACE VIEW top_entries AS SELECT * FROM top_entries_n(1000);

-- Attention pattern over each query's causal keys (softmax of the exact scores).
CREATE OR REPLACE VIEW pattern AS
SELECT layer, head, sample, q, k, induction, score,
       exp(score - smax) / sum(exp(score - smax)) OVER (PARTITION BY layer, head, sample, q) AS prob
FROM (SELECT *, max(score) OVER (PARTITION BY layer, head, sample, q) AS smax FROM pairs);

-- Per head: how the score splits into feature x feature, SAE-error/b_dec and bias terms (share of
-- the summed absolute terms), and the head's induction behaviour on this corpus. The macro takes
-- one layer / head (NULL for all), so that a page showing one head reads only its partitions.
CREATE OR REPLACE MACRO head_summary_at(lyr, hd) AS TABLE
WITH p AS (
  SELECT * FROM pairs WHERE (lyr IS NULL OR layer = lyr) AND (hd IS NULL OR head = hd)
), terms AS (
  SELECT layer, head,
         avg(abs(ff)) AS ff_abs_mean,
         avg(abs(f_bdec) + abs(bdec_f)) AS bdec_cross_abs_mean,
         avg(abs(f_err) + abs(err_f)) AS err_cross_abs_mean,
         avg(abs(resid_resid)) AS resid_resid_abs_mean,
         avg(abs(bias)) AS bias_abs_mean,
         avg(abs(score - (ff + f_bdec + f_err + bdec_f + err_f + resid_resid + bias))) AS completeness_err,
         sum(kept_abs) / nullif(sum(ff_abs), 0) AS kept_abs_share
  FROM p GROUP BY layer, head
), iq AS (  -- queries that have an induction target
  SELECT DISTINCT layer, head, sample, q FROM p WHERE induction
), mx AS (
  SELECT p.*, max(p.score) OVER (PARTITION BY p.layer, p.head, p.sample, p.q) AS smax
  FROM p SEMI JOIN iq USING (layer, head, sample, q)
), pr AS (
  SELECT layer, head, induction, score,
         exp(score - smax) / sum(exp(score - smax)) OVER (PARTITION BY layer, head, sample, q) AS prob
  FROM mx
), ind AS (
  SELECT layer, head,
         avg(CASE WHEN induction THEN prob END) AS ind_attn,
         avg(CASE WHEN induction THEN score END) - avg(CASE WHEN NOT induction THEN score END) AS ind_score_gap
  FROM pr GROUP BY layer, head
)
SELECT t.*,
       ff_abs_mean / (ff_abs_mean + bdec_cross_abs_mean + err_cross_abs_mean + resid_resid_abs_mean + bias_abs_mean) AS ff_share,
       err_cross_abs_mean / (ff_abs_mean + bdec_cross_abs_mean + err_cross_abs_mean + resid_resid_abs_mean + bias_abs_mean) AS err_share,
       (bdec_cross_abs_mean + resid_resid_abs_mean) / (ff_abs_mean + bdec_cross_abs_mean + err_cross_abs_mean + resid_resid_abs_mean + bias_abs_mean) AS bdec_resid_share,
       bias_abs_mean / (ff_abs_mean + bdec_cross_abs_mean + err_cross_abs_mean + resid_resid_abs_mean + bias_abs_mean) AS bias_share,
       i.ind_attn, i.ind_score_gap
FROM terms t LEFT JOIN ind i USING (layer, head)
ORDER BY layer, head;

CREATE OR REPLACE VIEW head_summary AS SELECT * FROM head_summary_at(NULL, NULL);

-- Each channel's count and sum, optionally without its q = k entries (a token's attention to
-- itself, from channel_diag, which the explain pass writes; `fra query` refuses no_diag on an
-- index without it). lyr / hd NULL for every layer / head.
CREATE OR REPLACE MACRO channel_sums_at(lyr, hd, no_diag) AS TABLE
SELECT c.layer, c.head, c.feat_q, c.feat_k,
       c.count - CASE WHEN no_diag THEN coalesce(d.count, 0) ELSE 0 END AS count,
       c.sum - CASE WHEN no_diag THEN coalesce(d.sum, 0) ELSE 0 END AS sum
FROM (SELECT * FROM channels WHERE (lyr IS NULL OR layer = lyr) AND (hd IS NULL OR head = hd)) c
LEFT JOIN (SELECT * FROM channel_diag WHERE no_diag AND (lyr IS NULL OR layer = lyr) AND (hd IS NULL OR head = hd)) d
  USING (layer, head, feat_q, feat_k);

-- Head marginals: per head and feature on one side ('q' or 'k'), the exact sum of the sums of
-- the channels with that feature on that side, and its share of the head's summed channel sums
-- (before no_self drops the feat_q = feat_k channels, so shares stay shares of the whole head).
CREATE OR REPLACE MACRO feature_marginals_at(side, lyr, hd, no_diag, no_self) AS TABLE
WITH c AS (
  SELECT *, sum(sum) OVER (PARTITION BY layer, head) AS head_total FROM channel_sums_at(lyr, hd, no_diag)
)
SELECT layer, head, CASE WHEN side = 'q' THEN feat_q ELSE feat_k END AS feat,
       count(*) AS n_channels, sum(count)::BIGINT AS count, sum(sum) AS total,
       sum(sum) / nullif(any_value(head_total), 0) AS share_of_head
FROM c WHERE NOT (no_self AND feat_q = feat_k)
GROUP BY layer, head, feat;

CREATE OR REPLACE VIEW query_feature_marginals AS
SELECT layer, head, feat AS feat_q, n_channels, total, share_of_head
FROM feature_marginals_at('q', NULL, NULL, false, false);

CREATE OR REPLACE VIEW key_feature_marginals AS
SELECT layer, head, feat AS feat_k, n_channels, total, share_of_head
FROM feature_marginals_at('k', NULL, NULL, false, false);

-- Per head, channels ranked by 'mean' (|mean-when-active|), 'total' (|sum| = |count * mean|,
-- the channel's contribution to the head) or 'share' (|share of the head's summed feature x
-- feature terms|, ordered as 'total' within a head); no_diag leaves out q = k entries (from the
-- counts, the sums and the head's total), no_self the feat_q = feat_k channels.
CREATE OR REPLACE MACRO ranked_channels_at(lyr, hd, min_count, drop_noise, no_diag, no_self, rank_by, n) AS TABLE
WITH t AS (
  SELECT layer, head, sum(ff) - CASE WHEN no_diag THEN coalesce(sum(ff) FILTER (WHERE q = k), 0) ELSE 0 END AS ff_total
  FROM pairs WHERE (lyr IS NULL OR layer = lyr) AND (hd IS NULL OR head = hd) GROUP BY layer, head
), cand AS (
  SELECT c.layer, c.head, c.feat_q, c.feat_k, c.count, c.sum, c.sum / c.count AS mean,
         c.sum / nullif(t.ff_total, 0) AS share_of_head, c.feat_q = c.feat_k AS self_pair
  FROM channel_sums_at(lyr, hd, no_diag) c JOIN t USING (layer, head)
  WHERE c.count >= greatest(min_count, 1) AND NOT (no_self AND c.feat_q = c.feat_k)
), noise AS (
  SELECT layer, feature FROM noise_features WHERE drop_noise AND (lyr IS NULL OR layer = lyr)
), top AS (  -- a top-n aggregate per head, not a sort of every channel; ties: smaller feat_q, feat_k
  SELECT c.layer, c.head,
         max_by(struct_pack(feat_q := c.feat_q, feat_k := c.feat_k, count := c.count, mean := c.mean, sum := c.sum,
                            share_of_head := c.share_of_head, self_pair := c.self_pair),
                struct_pack(v := abs(CASE rank_by WHEN 'mean' THEN c.mean WHEN 'total' THEN c.sum ELSE c.share_of_head END),
                            q := -c.feat_q, k := -c.feat_k), n) AS best
  FROM cand c
  ANTI JOIN noise nq ON nq.layer = c.layer AND nq.feature = c.feat_q
  ANTI JOIN noise nk ON nk.layer = c.layer AND nk.feature = c.feat_k
  GROUP BY c.layer, c.head
)
SELECT layer, head, unnest(best, recursive := true), generate_subscripts(best, 1) AS rank FROM top;

-- What each view and macro holds, in the database itself: any DuckDB client lists these with
-- duckdb_views(), duckdb_columns() and duckdb_functions() (the tables' own descriptions come from
-- fra/ingest/index/schema.py through fra.queries.connect).
COMMENT ON VIEW head_totals IS 'Per head: totals over every causal (sample, q, k) of the pairs table.';
COMMENT ON COLUMN head_totals.layer IS 'layer';
COMMENT ON COLUMN head_totals.head IS 'query head';
COMMENT ON COLUMN head_totals.ff_total IS 'sum of all feature x feature terms (exact, before pruning)';
COMMENT ON COLUMN head_totals.ff_abs_total IS 'sum of |FA| over all feature pairs';
COMMENT ON COLUMN head_totals.kept_abs_total IS 'sum of |value| of the stored rows';
COMMENT ON COLUMN head_totals.n_pairs IS 'number of causal (sample, q, k)';

COMMENT ON MACRO TABLE channel_stats_at IS 'channel_stats for one layer / head (NULL for all): channel_stats_at(layer, head).';
COMMENT ON VIEW channel_stats IS 'One row per stored channel (layer, head, feat_q, feat_k): its exact statistics over the corpus.';
COMMENT ON COLUMN channel_stats.layer IS 'layer';
COMMENT ON COLUMN channel_stats.head IS 'query head';
COMMENT ON COLUMN channel_stats.feat_q IS 'SAE feature active at the query position';
COMMENT ON COLUMN channel_stats.feat_k IS 'SAE feature active at the key position';
COMMENT ON COLUMN channel_stats.count IS 'causal (q, k) pairs with feat_q active at q and feat_k at k (q = k included)';
COMMENT ON COLUMN channel_stats.mean IS 'mean FA when both features are active (sum / count)';
COMMENT ON COLUMN channel_stats.std IS 'standard deviation of FA over the same pairs';
COMMENT ON COLUMN channel_stats.sum IS 'sum of FA over the same pairs: the channel''s total contribution to the head (count * mean)';
COMMENT ON COLUMN channel_stats.ind_count IS 'count restricted to induction targets';
COMMENT ON COLUMN channel_stats.ind_mean IS 'mean FA on induction targets';
COMMENT ON COLUMN channel_stats.other_mean IS 'mean FA on the other pairs';
COMMENT ON COLUMN channel_stats.ind_diff IS 'ind_mean - other_mean: how much the channel favours induction targets';
COMMENT ON COLUMN channel_stats.share_of_head IS 'sum / the head''s summed feature x feature terms (all pairs, stored or not)';
COMMENT ON COLUMN channel_stats.abs_share_of_head IS '|sum| / the head''s summed |FA|';
COMMENT ON COLUMN channel_stats.self_pair IS 'feat_q = feat_k';

COMMENT ON VIEW noise_features IS 'Features flagged as BOS or punctuation (features.punct_or_bos).';
COMMENT ON COLUMN noise_features.layer IS 'layer';
COMMENT ON COLUMN noise_features.feature IS 'SAE latent';

COMMENT ON MACRO TABLE top_channels IS 'top_channels(layer, head, min_count, drop_noise, n): per head, the n channels of largest |mean-when-active| with count >= min_count (layer / head NULL for all).';
COMMENT ON MACRO TABLE feature_lookup IS 'feature_lookup(feature, layer): every channel with the feature on the query side, the key side or both (column side).';
COMMENT ON MACRO TABLE top_entries_n IS 'top_entries_n(n): the n stored rows of largest |FA|, with the tokens at q and k.';

COMMENT ON VIEW top_entries IS 'The 1000 stored rows of largest |FA| anywhere, with the tokens at q and k.';
COMMENT ON COLUMN top_entries.layer IS 'layer';
COMMENT ON COLUMN top_entries.head IS 'query head';
COMMENT ON COLUMN top_entries.sample IS 'sample id';
COMMENT ON COLUMN top_entries.q IS 'query position';
COMMENT ON COLUMN top_entries.k IS 'key position';
COMMENT ON COLUMN top_entries.feat_q IS 'query-side feature';
COMMENT ON COLUMN top_entries.feat_k IS 'key-side feature';
COMMENT ON COLUMN top_entries.value IS 'FA[q, k, feat_q, feat_k]';
COMMENT ON COLUMN top_entries.induction IS 'k is an induction target of q';
COMMENT ON COLUMN top_entries.token_q IS 'the token at q';
COMMENT ON COLUMN top_entries.token_k IS 'the token at k';

COMMENT ON VIEW pattern IS 'Attention pattern: softmax of the exact scores over each query''s causal keys.';
COMMENT ON COLUMN pattern.layer IS 'layer';
COMMENT ON COLUMN pattern.head IS 'query head';
COMMENT ON COLUMN pattern.sample IS 'sample id';
COMMENT ON COLUMN pattern.q IS 'query position';
COMMENT ON COLUMN pattern.k IS 'key position, k <= q';
COMMENT ON COLUMN pattern.induction IS 'k is an induction target of q';
COMMENT ON COLUMN pattern.score IS 'the model''s attention score';
COMMENT ON COLUMN pattern.prob IS 'attention probability of k for query q';

COMMENT ON MACRO TABLE head_summary_at IS 'head_summary for one layer / head (NULL for all): head_summary_at(layer, head).';
COMMENT ON VIEW head_summary IS 'Per head: how the score splits into feature x feature, b_dec, SAE-error and bias terms, and its induction behaviour on this corpus.';
COMMENT ON COLUMN head_summary.layer IS 'layer';
COMMENT ON COLUMN head_summary.head IS 'query head';
COMMENT ON COLUMN head_summary.ff_abs_mean IS 'mean |feature x feature term| per (q, k)';
COMMENT ON COLUMN head_summary.bdec_cross_abs_mean IS 'mean |features x b_dec| + |b_dec x features|';
COMMENT ON COLUMN head_summary.err_cross_abs_mean IS 'mean |features x error| + |error x features|';
COMMENT ON COLUMN head_summary.resid_resid_abs_mean IS 'mean |(b_dec + error) x (b_dec + error)|';
COMMENT ON COLUMN head_summary.bias_abs_mean IS 'mean |bias terms|';
COMMENT ON COLUMN head_summary.completeness_err IS 'mean |score - sum of the terms|: float rounding only';
COMMENT ON COLUMN head_summary.kept_abs_share IS 'share of the summed |FA| that the stored rows carry';
COMMENT ON COLUMN head_summary.ff_share IS 'feature x feature share of the summed |terms|';
COMMENT ON COLUMN head_summary.err_share IS 'features x error share of the summed |terms|';
COMMENT ON COLUMN head_summary.bdec_resid_share IS 'share of the summed |terms| with b_dec, (b_dec + error) x (b_dec + error) included';
COMMENT ON COLUMN head_summary.bias_share IS 'bias share of the summed |terms|';
COMMENT ON COLUMN head_summary.ind_attn IS 'mean attention probability on the induction target, over queries that have one';
COMMENT ON COLUMN head_summary.ind_score_gap IS 'mean score on induction targets minus mean score on the other keys of those queries';

COMMENT ON MACRO TABLE channel_sums_at IS 'channel_sums_at(layer, head, no_diag): each channel''s count and sum, without its q = k entries (channel_diag) when no_diag.';
COMMENT ON MACRO TABLE feature_marginals_at IS 'feature_marginals_at(side, layer, head, no_diag, no_self): head marginals by the query (side ''q'') or key (''k'') feature; columns feat, n_channels, count, total, share_of_head.';
COMMENT ON MACRO TABLE ranked_channels_at IS 'ranked_channels_at(layer, head, min_count, drop_noise, no_diag, no_self, rank_by, n): per head, the n channels of largest |mean| (rank_by ''mean''), |sum| (''total'') or |share_of_head| (''share'').';

COMMENT ON VIEW query_feature_marginals IS 'Head marginals by query feature: what each feature at the query position carries of the head''s attention, summed exactly over the stored channels.';
COMMENT ON COLUMN query_feature_marginals.layer IS 'layer';
COMMENT ON COLUMN query_feature_marginals.head IS 'query head';
COMMENT ON COLUMN query_feature_marginals.feat_q IS 'SAE feature at the query position';
COMMENT ON COLUMN query_feature_marginals.n_channels IS 'stored channels with this query feature';
COMMENT ON COLUMN query_feature_marginals.total IS 'sum of channels.sum over those channels (q = k entries included)';
COMMENT ON COLUMN query_feature_marginals.share_of_head IS 'total / the head''s summed channels.sum';

COMMENT ON VIEW key_feature_marginals IS 'Head marginals by key feature: what each feature at the key position carries of the head''s attention, summed exactly over the stored channels.';
COMMENT ON COLUMN key_feature_marginals.layer IS 'layer';
COMMENT ON COLUMN key_feature_marginals.head IS 'query head';
COMMENT ON COLUMN key_feature_marginals.feat_k IS 'SAE feature at the key position';
COMMENT ON COLUMN key_feature_marginals.n_channels IS 'stored channels with this key feature';
COMMENT ON COLUMN key_feature_marginals.total IS 'sum of channels.sum over those channels (q = k entries included)';
COMMENT ON COLUMN key_feature_marginals.share_of_head IS 'total / the head''s summed channels.sum';
