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
