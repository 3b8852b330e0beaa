-- Parameterised queries used by `fra query` and the app. Each block starts with `-- name: NAME`;
-- every user value is a `?` parameter, bound at execution.

-- name: top_channels
SELECT layer, head, feat_q, feat_k, count, mean, std, ind_count, ind_mean, other_mean, ind_diff,
       share_of_head, self_pair
FROM top_channels(?, ?, ?, ?, ?) ORDER BY rank;

-- name: feature_channels
SELECT side, layer, head, feat_q, feat_k, count, mean, ind_diff, share_of_head
FROM feature_lookup(?, ?) WHERE count >= ? ORDER BY abs(mean) DESC LIMIT ?;

-- name: channel_examples
-- The channel's stored examples (the strongest entry of each of its strongest samples).
SELECT e.sample, e.q, e.k, e.value,
       (e.k >= 1 AND e.k < e.q AND s.token_ids[e.k] = s.token_ids[e.q + 1]) AS induction,
       s.tokens[e.q + 1] AS token_q, s.tokens[e.k + 1] AS token_k,
       array_to_string(s.tokens[greatest(e.k - 3, 1) : e.k + 1], '') AS context_k,
       array_to_string(s.tokens[greatest(e.q - 3, 1) : e.q + 1], '') AS context_q
FROM examples e JOIN samples s USING (sample)
WHERE e.layer = ? AND e.head = ? AND e.feat_q = ? AND e.feat_k = ?
ORDER BY e.rank LIMIT ?;

-- name: feature_info
SELECT * FROM features WHERE feature = ? AND (? IS NULL OR layer = ?);

-- name: head_summary
SELECT * FROM head_summary;

-- name: channel_heatmap
SELECT q, k, value FROM rows WHERE layer = ? AND head = ? AND sample = ? AND feat_q = ? AND feat_k = ?;

-- name: sample
SELECT * FROM samples WHERE sample = ?;

-- name: sample_ids
SELECT sample, n_tokens, left(text, 80) AS text FROM samples ORDER BY sample;

-- name: pattern
SELECT q, k, score, prob, induction FROM pattern WHERE layer = ? AND head = ? AND sample = ?;

-- name: query_rows
SELECT k, feat_q, feat_k, value FROM rows
WHERE layer = ? AND head = ? AND sample = ? AND q = ? ORDER BY abs(value) DESC;

-- name: channel_offsets
SELECT e.q - e.k AS offset, count(*) AS n, avg(e.value) AS mean,
       sum(CASE WHEN e.k >= 1 AND e.k < e.q AND s.token_ids[e.k] = s.token_ids[e.q + 1] THEN 1 ELSE 0 END) AS n_induction
FROM examples e JOIN samples s USING (sample)
WHERE e.layer = ? AND e.head = ? AND e.feat_q = ? AND e.feat_k = ?
GROUP BY 1 ORDER BY 1;

-- name: layers_heads
SELECT DISTINCT layer, head FROM head_totals ORDER BY layer, head;

-- name: n_features
SELECT count(*) AS n FROM features WHERE layer = ?;

-- name: pair_terms
SELECT q, k, score, ff, kept, f_bdec, f_err, bdec_f, err_f, resid_resid, bias
FROM pairs WHERE layer = ? AND head = ? AND sample = ?;

-- name: channel_one
SELECT * FROM channel_stats_at(?, ?) WHERE feat_q = ? AND feat_k = ?;

-- name: head_summary_one
SELECT * FROM head_summary_at(?, ?);

-- name: feature_marginals
-- A head's query (side 'q') or key ('k') features by |summed channel contribution|, with labels.
SELECT m.feat, f.label, m.n_channels, m.count, m.total, m.share_of_head
FROM feature_marginals_at(?, ?, ?, ?, ?) m
LEFT JOIN features f ON f.layer = m.layer AND f.feature = m.feat
ORDER BY abs(m.total) DESC, m.feat LIMIT ?;

-- name: channel_ranking
SELECT layer, head, feat_q, feat_k, count, mean, sum, share_of_head, self_pair
FROM ranked_channels_at(?, ?, ?, ?, ?, ?, ?, ?) ORDER BY layer, head, rank;

-- name: has_channel_diag
SELECT count(*) > 0 AS present FROM (SELECT 1 FROM channel_diag LIMIT 1);

-- explorer
-- name: explorer_features
SELECT * FROM features WHERE layer = ? ORDER BY feature;

-- name: explorer_strongest_channels
SELECT * FROM top_channels(NULL, NULL, ?, ?, ?) ORDER BY abs(mean) DESC, layer, head LIMIT ?;

-- explorer v3 (the example-explanation tables: see fra/ingest/index/schema.py)
-- name: example_terms_at
-- The exact split of the score at one (sample, q, k): the top pairs, the rest, b_dec, error, bias, score.
SELECT rank, kind, feat_q, feat_k, value FROM example_terms
WHERE layer = ? AND head = ? AND sample = ? AND q = ? AND k = ? ORDER BY kind = 'score', rank, kind;

-- name: channel_at
-- The channel's own FA at one (sample, q, k), where the index stores it (an example, or a kept row).
SELECT 'example' AS source, value FROM examples
WHERE layer = $1 AND head = $2 AND feat_q = $3 AND feat_k = $4 AND sample = $5 AND q = $6 AND k = $7
UNION ALL
SELECT 'row' AS source, value FROM rows
WHERE layer = $1 AND head = $2 AND feat_q = $3 AND feat_k = $4 AND sample = $5 AND q = $6 AND k = $7;

-- name: stored_channels_among
-- Which of the given (feat_q, feat_k) pairs are stored channels of a head, with their count.
SELECT c.feat_q, c.feat_k, c.count FROM channels c
JOIN (SELECT unnest($3::INTEGER[]) AS feat_q, unnest($4::INTEGER[]) AS feat_k) p USING (feat_q, feat_k)
WHERE c.layer = $1 AND c.head = $2;

-- name: cooccurrence
-- Causal (q, k) pairs (k <= q) of the indexed samples where feat_q fires at q and feat_k at k.
SELECT count(*) AS n FROM activations a JOIN activations b USING (sample)
WHERE a.layer = $1 AND b.layer = $1 AND a.feat = $2 AND b.feat = $3 AND b.pos <= a.pos;

-- name: ranked_channels
-- Channels of one head (or of every head: NULL, NULL), ranked by `by`: 'mean' (|mean-when-active|),
-- 'total' (|summed FA|) or 'share' (|share of the head's feature x feature part|), at most $7 per
-- head and $8 in all. Params: layer, head, by, min_count, drop_noise, exclude_self, per_head, n.
-- The ranking reads only the narrow channel columns; the statistics are joined for the winners.
WITH t AS (
  SELECT layer, head, sum(ff) AS ff_total FROM pairs
  WHERE ($1 IS NULL OR layer = $1) AND ($2 IS NULL OR head = $2) GROUP BY layer, head
), noise AS (
  SELECT layer, feature FROM noise_features WHERE $5
), k AS (
  SELECT c.layer, c.head, c.feat_q, c.feat_k,
         CASE $3 WHEN 'mean' THEN abs(c.sum / c.count) WHEN 'total' THEN abs(c.sum)
              ELSE abs(c.sum / nullif(t.ff_total, 0)) END AS rank_key
  FROM channels c JOIN t USING (layer, head)
  WHERE ($1 IS NULL OR c.layer = $1) AND ($2 IS NULL OR c.head = $2) AND c.count >= $4
    AND NOT ($6 AND c.feat_q = c.feat_k)
), best AS (
  SELECT k.* FROM k
  ANTI JOIN noise nq ON nq.layer = k.layer AND nq.feature = k.feat_q
  ANTI JOIN noise nk ON nk.layer = k.layer AND nk.feature = k.feat_k
  QUALIFY row_number() OVER (PARTITION BY k.layer, k.head ORDER BY k.rank_key DESC, k.feat_q, k.feat_k) <= $7
  ORDER BY k.rank_key DESC, k.layer, k.head, k.feat_q, k.feat_k LIMIT $8
)
SELECT s.*, b.rank_key FROM best b
JOIN channel_stats_at($1, $2) s USING (layer, head, feat_q, feat_k)
ORDER BY b.rank_key DESC, s.layer, s.head, s.feat_q, s.feat_k;

-- name: query_marginals
SELECT feat_q, n_channels, total, share_of_head FROM query_feature_marginals
WHERE layer = ? AND head = ? ORDER BY abs(total) DESC LIMIT ?;

-- name: key_marginals
SELECT feat_k, n_channels, total, share_of_head FROM key_feature_marginals
WHERE layer = ? AND head = ? ORDER BY abs(total) DESC LIMIT ?;

-- name: feature_activations
-- Every activation of one feature in the indexed samples.
SELECT sample, pos, act FROM activations WHERE layer = ? AND feat = ? ORDER BY act DESC;

-- name: sample_feature_acts
-- One feature's activations over chosen samples (to colour their contexts).
SELECT sample, pos, act FROM activations WHERE layer = ? AND feat = ? AND list_contains(?::INTEGER[], sample);

-- name: query_pattern
-- The attention of one query over its keys.
SELECT k, score, prob, induction FROM pattern WHERE layer = ? AND head = ? AND sample = ? AND q = ? ORDER BY k;

-- name: feature_side_channels
-- The channels of a feature on one side ('query' or 'key'; a self pair counts on both), by |summed FA|.
SELECT side, layer, head, feat_q, feat_k, count, sum, mean, share_of_head, ind_diff
FROM feature_lookup(?, ?) WHERE side IN (?, 'both') ORDER BY abs(sum) DESC, head, feat_q, feat_k LIMIT ?;
