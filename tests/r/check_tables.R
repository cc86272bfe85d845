# Runs after the README's R snippet (tests/test_interop_r.py puts them together): checks in R
# what R can check alone, then writes what R read, full precision, as CSV files under `dump`
# for the Python side to compare with what it wrote.

stopifnot(identical(dim(pre), c(length(patient), length(metric))))
stopifnot(identical(dim(post), dim(pre)), identical(dim(delta), dim(pre)))
stopifnot(identical(names(metrics), c("patient_id", "timepoint", "slide_id", "metric", "value", "unit")))
stopifnot(is.numeric(metrics$value))
stopifnot(all(!is.na(metrics$unit) & nzchar(metrics$unit)))            # every metric has a unit
stopifnot(all(unit[metrics$metric] == metrics$unit))                   # the same unit as var
stopifnot(all(abs(delta - (post - pre)) <= 1e-9 * abs(post) | is.na(delta)))

num <- function(x) ifelse(is.na(x), "NaN", sprintf("%.17g", x))
long <- function(m) data.frame(patient = rep(rownames(m), ncol(m)), metric = rep(colnames(m), each = nrow(m)),
                               value = num(as.vector(m)))
for (name in c("pre", "post", "delta", "log2_fold_change")) {
  write.csv(long(layer(name)), file.path(dump, paste0("layer_", name, ".csv")), row.names = FALSE)
}
obs <- data.frame(patient = patient, complete = complete, transition = as.character(transition),
                  reason = column(h5, "reason"), response = column(h5, "response"),
                  pre_slide_id = column(h5, "pre_slide_id"), immune_class_post = as.character(column(h5, "immune_class_post")))
write.csv(obs, file.path(dump, "obs.csv"), row.names = FALSE, na = "<NA>")
write.csv(data.frame(metric = metric, unit = unit), file.path(dump, "var.csv"), row.names = FALSE)
metrics$value <- num(metrics$value)
write.csv(metrics, file.path(dump, "metrics.csv"), row.names = FALSE, na = "<NA>")
