import json

import alignment_risk
import torch
from alignment_risk.forecast import ForecastConfig, forecast_stability
from alignment_risk.pipeline import AlignmentRiskPipeline

cases = [
    dict(
        eigenvalues=[5.0, 3.0, 2.0, 1.5],
        gamma_hat=2.0,
        eps_hat=0.0,
        lr=1e-3,
        threshold=1e-9,
        max_steps=100000,
    ),
    dict(
        eigenvalues=[9.0, 4.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.005],
        gamma_hat=0.7,
        eps_hat=0.01,
        lr=0.05,
        threshold=1e-4,
        max_steps=5000,
    ),
    dict(
        eigenvalues=[3.0, 2.0, -0.5],
        gamma_hat=1.3,
        eps_hat=0.2,
        lr=0.1,
        threshold=1e-3,
        max_steps=2000,
    ),
    dict(
        eigenvalues=[2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
        gamma_hat=0.05,
        eps_hat=0.0,
        lr=0.01,
        threshold=10.0,
        max_steps=300,
    ),
]
out = []
for c in cases:
    lam = AlignmentRiskPipeline._stable_lambda_min(
        None,
        type(
            "S", (), {"fisher_eigenvalues": torch.tensor(c["eigenvalues"], dtype=torch.float64)}
        )(),
    )
    fc = forecast_stability(
        lam,
        c["lr"] ** 2 * c["gamma_hat"],
        c["lr"] * c["eps_hat"],
        ForecastConfig(
            max_steps=c["max_steps"], step_size=1.0, collapse_loss_threshold=c["threshold"]
        ),
    )
    probe = sorted(
        {0, 1, c["max_steps"] // 3, c["max_steps"]}
        | ({fc.collapse_step - 1, fc.collapse_step} if fc.collapse_step else set())
    )
    out.append(
        dict(
            c,
            lambda_min=lam,
            collapse_step=fc.collapse_step,
            probe_steps=probe,
            estimate=[float(fc.estimated_loss[k]) for k in probe],
            drift=[float(fc.projected_drift[k]) for k in probe],
        )
    )
print(
    json.dumps(
        {
            "made_by": "alignment-risk "
            + alignment_risk.__version__
            + ", torch "
            + torch.__version__,
            "command": "pip install torch==2.13.0 && pip install --no-deps alignment-risk==1.14.1 && python tests/data/make_peer_forecast.py > tests/data/peer_forecast.json",
            "cases": out,
        },
        indent=1,
    )
)
