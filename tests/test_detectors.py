"""Each detector against a trusted implementation on the same data: nearest-neighbour cosine
against scikit-learn's NearestNeighbors, Mahalanobis against scipy.spatial.distance."""
import numpy as np
import torch
from scipy.spatial import distance
from sklearn.neighbors import NearestNeighbors

import detectors


def test_nearest_cosine_equals_scikit_learn():
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((40, 16)), rng.standard_normal((25, 16))
    det = detectors.NearestCosine().fit(torch.from_numpy(train).float())
    ref = NearestNeighbors(n_neighbors=2, metric="cosine").fit(train)
    dist, _ = ref.kneighbors(test, n_neighbors=1)
    assert np.allclose(det.score(torch.from_numpy(test).float()).numpy(), dist[:, 0], atol=1e-6)
    # leave-one-out: the nearest neighbour of a training point other than itself
    dist, _ = ref.kneighbors(train, n_neighbors=2)
    assert np.allclose(det.train_scores().numpy(), dist[:, 1], atol=1e-6)
    assert (det.train_scores() > 1e-3).all()           # never the zero distance to itself


def test_nearest_cosine_ignores_length_and_round_trips_its_state():
    x = torch.randn(10, 8)
    det = detectors.NearestCosine().fit(x)
    assert torch.allclose(det.score(3.0 * x), torch.zeros(10, dtype=torch.float64), atol=1e-6)
    again = detectors.NearestCosine().load_state(det.state())
    assert torch.equal(again.score(x[:3] + 0.1), det.score(x[:3] + 0.1))


def test_nearest_cosine_keeps_apart_embeddings_close_to_each_other():
    """Midea's training embeddings of real valve clips fell within cosine distance 1.7e-4;
    1 - cos in float32 comes in steps of 6e-8 and tied there. Here test points lie about
    1e-6 from their nearest training point: in float64 each gets its own distance, equal to
    scikit-learn's on the same float32 embeddings; in float32 most of them tie."""
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(128)
    train, test = (torch.from_numpy(centre + 1e-3 * rng.standard_normal((n, 128))).float()
                   for n in (40, 200))
    det = detectors.NearestCosine().fit(train)
    got = det.score(test).numpy()
    dist, _ = NearestNeighbors(n_neighbors=1, metric="cosine").fit(
        train.double().numpy()).kneighbors(test.double().numpy())
    assert got.max() < 2e-6 and np.allclose(got, dist[:, 0], rtol=1e-6, atol=1e-12)
    float32 = 1.0 - (torch.nn.functional.normalize(test) @ det.train.float().T).max(dim=1).values
    assert len(np.unique(got)) == 200 > 2 * len(np.unique(float32.numpy()))


def test_mahalanobis_equals_scipy_and_takes_the_nearer_domain():
    rng = np.random.default_rng(1)
    source = rng.standard_normal((400, 5)) * [1, 2, 3, 4, 5]
    target = rng.standard_normal((60, 5)) * [5, 4, 3, 2, 1] + 0.5
    det = detectors.Mahalanobis().fit({"source": torch.from_numpy(source),
                                       "target": torch.from_numpy(target)})
    clips = [rng.standard_normal((7, 5)) * 2 for _ in range(6)]
    got = det.score([torch.from_numpy(c).float() for c in clips])
    zero = np.zeros(5)
    for clip, score in zip(clips, got):
        per_domain = []
        for train in (source, target):
            vi = np.linalg.pinv(np.cov(train.T))
            per_domain.append(np.mean([distance.mahalanobis(v, zero, vi) ** 2 for v in clip]))
        assert np.isclose(score, min(per_domain), rtol=1e-4)


def test_mahalanobis_separates_an_anomalous_direction():
    """Errors that grow along a direction the training errors never used score far higher."""
    rng = np.random.default_rng(2)
    cov_scale = np.array([3.0, 3.0, 3.0, 0.1])
    det = detectors.Mahalanobis().fit({"source": torch.from_numpy(
        rng.standard_normal((500, 4)) * cov_scale).float()})
    normal = [torch.from_numpy(rng.standard_normal((20, 4)) * cov_scale).float() for _ in range(20)]
    odd = [torch.from_numpy(rng.standard_normal((20, 4)) * [3, 3, 3, 1.0]).float() for _ in range(20)]
    normal_scores, odd_scores = det.score(normal), det.score(odd)
    assert normal_scores.max() < odd_scores.min()
    again = detectors.Mahalanobis().load_state(det.state())
    assert np.array_equal(again.score(odd), odd_scores)
