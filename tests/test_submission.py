"""The submission package's checks: the label's form, and the 2023+ warning when the eval set's
ground truth lacks ground_truth_attributes/ (the organisers' evaluators then score nothing
and still exit 0). The package itself is checked end to end in test_run_all.py."""
import pytest

import asd
import submission


@pytest.mark.parametrize("label, ok", [("Smith_UniA_task2_1", True), ("Lopez-Diaz_ABC-1_task2_4", True),
                                       ("Smith_task2_1", False), ("Smith_UniA_task1_1", False),
                                       ("Smith_UniA_task2_5", False)])
def test_label_has_the_organisers_form(label, ok):
    assert bool(submission.LABEL.match(label)) == ok


def test_a_bad_label_is_refused_before_anything_is_read(tmp_path, capsys):
    assert asd.main(["package", "--label", "Smith_task2_1", "--out", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "--label Smith_task2_1: not <Lastname>_<Institute>_task2_<1-4>" in err


def test_missing_attribute_tables_are_warned_about_from_2023(tmp_path):
    (tmp_path / "ground_truth_data").mkdir()
    assert "ground_truth_attributes" in submission.truth_warning(2023, tmp_path)
    assert submission.truth_warning(2022, tmp_path) is None          # 2022's evaluator needs none
    (tmp_path / "ground_truth_attributes").mkdir()
    assert submission.truth_warning(2024, tmp_path) is None
