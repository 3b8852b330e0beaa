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
SELECT * FROM (
  SELECT c.*, row_number() OVER (PARTITION BY c.layer, c.head ORDER BY abs(c.mean) DESC, c.feat_q, c.feat_k) AS rank
  FROM cand c
  ANTI JOIN noise nq ON nq.layer = c.layer AND nq.feature = c.feat_q
  ANTI JOIN noise nk ON nk.layer = c.layer AND nk.feature = c.feat_k
) WHERE rank <= n;

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
