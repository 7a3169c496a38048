"""The resolution schedule (progressive resizing): a pure function of the epoch, FFCV's rule."""
from __future__ import annotations

import pytest

from pipeline import ResolutionSchedule, create_loader
from pipeline.resolution import as_schedule


def test_ffcv_ramp_rounds_to_the_step():
    # FFCV's rn50 88-epoch config: 160 px to epoch 65, 192 px from epoch 76, multiples of 32.
    s = ResolutionSchedule(160, 192, start_epoch=65, end_epoch=76, step=32)
    sizes = s.sizes(88)
    assert sizes[:66] == [160] * 66 and sizes[76:] == [192] * 12
    assert set(sizes) == {160, 192} and sizes.index(192) == 71  # the interpolation passes 176 at epoch 70.5
    assert s.max_size == 192 and not s.fixed


def test_sizes_stay_within_the_ends_and_a_constant_is_fixed():
    s = ResolutionSchedule(44, 64, start_epoch=2, end_epoch=9, step=8)
    assert [s.size(e) for e in range(12)] == [44, 44, 44, 48, 48, 56, 56, 56, 64, 64, 64, 64]
    assert as_schedule(32) == ResolutionSchedule.constant(32) and as_schedule(32).size(1000) == 32


@pytest.mark.parametrize("kwargs,message", [
    ({"start": 4, "end": 32}, "sizes must be >= 8"),
    ({"start": 16, "end": 32, "start_epoch": 5, "end_epoch": 3}, "start_epoch <= end_epoch"),
    ({"start": 16, "end": 32, "step": 0}, "step must be >= 1"),
])
def test_a_bad_schedule_is_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResolutionSchedule(**kwargs)


def test_create_loader_refuses_a_bad_image_size_naming_it():
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        create_loader(None, backend="synthetic", image_size=4, device="cpu")
    with pytest.raises(TypeError, match="image_size must be an int or a ResolutionSchedule"):
        create_loader(None, backend="synthetic", image_size="224", device="cpu")
