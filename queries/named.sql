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
SELECT r.sample, r.q, r.k, r.value, r.induction, s.tokens[r.q + 1] AS token_q, s.tokens[r.k + 1] AS token_k,
       array_to_string(s.tokens[greatest(r.k - 3, 1) : r.k + 1], '') AS context_k,
       array_to_string(s.tokens[greatest(r.q - 3, 1) : r.q + 1], '') AS context_q
FROM rows r JOIN samples s USING (sample)
WHERE r.layer = ? AND r.head = ? AND r.feat_q = ? AND r.feat_k = ?
ORDER BY abs(r.value) DESC LIMIT ?;

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
SELECT q - k AS offset, count(*) AS n, avg(value) AS mean, sum(CASE WHEN induction THEN 1 ELSE 0 END) AS n_induction
FROM rows WHERE layer = ? AND head = ? AND feat_q = ? AND feat_k = ?
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

-- explorer
-- name: explorer_features
SELECT * FROM features WHERE layer = ? ORDER BY feature;

-- name: explorer_strongest_channels
SELECT * FROM top_channels(NULL, NULL, ?, ?, ?) ORDER BY abs(mean) DESC, layer, head LIMIT ?;
