"""Audit a model over a whole data set (``convlens audit``): every image explained by the chosen
methods, the results as rows of a Parquet file, on one machine or a Ray cluster, and SpRAy
(Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing what machines really
learn", Nature Communications) to find the strategies a class is decided by; ``write_page(out)``
(re)writes the audit's page ``out/index.html``."""

from convlens.audit.page import write_page
from convlens.audit.run import explain_batch, run
from convlens.audit.spray import Spray, spray

__all__ = ["Spray", "explain_batch", "run", "spray", "write_page"]
