"""HTML stripping and the broken-code score, on hand-built documents."""

import pytest

from polyglot_jax.data.markup import code_share, strip_html

STRIP_CASES = [
    ("<p>첫 문단</p><p>둘째 문단</p>", "\n첫 문단\n\n둘째 문단\n"),
    ("줄<br>바꿈<br/>두 번<BR />", "줄\n바꿈\n두 번\n"),
    ('<a href="https://x.kr/?a=1&b=2" class="l">링크</a> 글', "링크 글"),
    ("<b>굵게</b> <span style='color: red'>빨강</span>", "굵게 빨강"),
    ("<td>가</td><td>나</td>", " 가  나 "),
    ("앞<script>var x = '<p>';</script>뒤", "앞\n뒤"),
    ("앞<style>p { color: red }</style>뒤", "앞\n뒤"),
    ("주석<!-- 숨김 -->끝", "주석끝"),
    (
        "&lt;b&gt; 는 태그, &amp;는 앰퍼샌드, &#44032;&#xAC01;, A&nbsp;B",
        "<b> 는 태그, &는 앰퍼샌드, 가각, A\xa0B",
    ),
    ('<img src="a.png" alt="사진 (1)">그림', "그림"),
    ("<p\nclass='x'>여러 줄 태그</p\n>", "\n여러 줄 태그\n"),
    ("<!-- 닫히지 않은 주석 <b>굵게</b>", "<!-- 닫히지 않은 주석 굵게"),
]
UNTOUCHED = [
    "영화 <기생충> 최고",
    "<|tel|>로 연락, <|acc|>로 입금",
    "a < b 이고 c > d",
    "x<y and z>w",
    "R&D, AT&T, 3 & 4",
    "<이름>님 안녕하세요",
]


@pytest.mark.parametrize(("text", "expected"), STRIP_CASES)
def test_strip_html(text, expected):
    assert strip_html(text)[0] == expected


@pytest.mark.parametrize("text", UNTOUCHED)
def test_strip_html_leaves_non_markup(text):
    assert strip_html(text) == (text, 0)


CODE_DOCS = [
    # an HTML fragment with little text
    '<div class="wrap"><ul><li><a href="/a">홈</a></li><li><a href="/b">소개</a></li></ul>'
    '</div><script src="/js/app.js"></script>',
    # JavaScript
    "var x = 1;\nfunction f(a, b) {\n  return a + b;\n}\nif (x > 0) {\n  console.log(f(x, 2));\n}\n",
    # CSS
    ".header {\n  color: #333;\n  margin: 0 auto;\n}\n#nav > li {\n  display: inline;\n}\n",
    # Markdown table and links
    "| a | b |\n|---|---|\n| 1 | 2 |\n[link](https://example.com/very/long/path?with=query)\n"
    "```\nconst y = 2;\n```\n",
]
PROSE_DOCS = [
    "이 영화는 정말 재밌었다. 배우들의 연기도 좋았고 음악도 훌륭했다.\n다시 보고 싶다.",
    "//명작// 이라고 쓰고 //인생영화// 라고 읽는다;;",
    "// 사랑 그 놈....",
    "재밌다 (진짜);\n최고의 영화 {강추}",
    "## 줄거리\n- 주인공이 여행을 떠난다\n- 친구를 만난다\n**강력 추천** 합니다",
    "설정은 이렇게 했어요:\nvar x = 1;\n그리고 나머지는 긴 설명이 이어집니다. 한국어 문장이 대부분인 문서입니다.",
]


@pytest.mark.parametrize("text", CODE_DOCS)
def test_code_documents_score_high(text):
    assert code_share(text) > 0.6


@pytest.mark.parametrize("text", PROSE_DOCS)
def test_prose_scores_low(text):
    assert code_share(text) < 0.3


def test_code_share_edge_cases():
    assert code_share("") == 0.0
    assert code_share("   \n ") == 0.0
    assert code_share("<p></p>") == 1.0
