"""Analysis of finished runs: result tables (Tables 2-6), cost tables (Table 1), Zipf fits (Fig. 2)."""
