"""The config sections of the analysis modules, as light modules (pydantic only).

``tme_pipeline.config`` builds the whole config from them; each analysis module
(``metrics``, ``regions``, ``tls``, ``analysis``, ``report``) re-exports its own, so that
reading or validating a config never imports pandas, scipy or anndata.
"""
